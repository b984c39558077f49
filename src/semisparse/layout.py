"""How a layer's weight becomes the ``(rows, K)`` view that :mod:`semisparse.patterns` works on, and back.

* ``Linear`` ``(out, in)`` is already the view; so is ``nn.MultiheadAttention``'s packed QKV
  ``in_proj_weight`` ``(3E, E)``.
* ``ConvNd`` ``(out, in/groups, *kernel)`` becomes ``(out, taps * in/groups)`` with the input channels
  innermost: groups of M run along **input channels at each kernel tap**, the order of channels-last
  implicit GEMM (NVIDIA ASP, TensorRT). A grouped conv needs nothing more: each output row only reads its
  own group's ``in/groups`` channels.
* With ``pad=True`` a conv whose channels per group are not a multiple of M (depthwise, the RGB stem) is
  made N:M along its kernel taps instead: the view is ``(out * in/groups, taps)`` padded with zeros to a
  multiple of M; the padding is never kept in preference to a real weight and is sliced off again.

This module also decides eligibility, and gives a reason for every layer it skips.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .patterns import NM, FanIn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Layout:
    """Maps one weight tensor to its ``(rows, K)`` view and back. ``mode``: "rows" | "conv" | "taps"."""

    mode: str
    shape: tuple[int, ...]

    @property
    def taps(self) -> int:
        return math.prod(self.shape[2:]) if len(self.shape) > 2 else 1

    @property
    def view_shape(self) -> tuple[int, int]:
        if self.mode == "taps":
            raise ValueError("padded layouts have no fixed view without M; use padded_width(m)")
        return (self.shape[0], math.prod(self.shape[1:]))

    def to_view(self, w: torch.Tensor, m: int | None = None, fill: float | bool = 0) -> torch.Tensor:
        """Weight (or mask) -> ``(rows, K)``. For "taps", ``m`` sets the padding, filled with ``fill``."""
        if self.mode == "rows":
            return w.reshape(self.shape[0], -1)
        if self.mode == "conv":
            out = w.shape[0]
            return w.reshape(out, w.shape[1], -1).transpose(1, 2).reshape(out, -1)
        if m is None:
            raise ValueError("a padded (taps) layout needs M")
        flat = w.reshape(-1, self.taps)
        pad = -self.taps % m
        if pad:
            flat = torch.cat([flat, flat.new_full((flat.shape[0], pad), fill)], dim=1)
        return flat

    def from_view(self, v: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_view` (padding dropped)."""
        if self.mode == "rows":
            return v.reshape(self.shape)
        if self.mode == "conv":
            out, cin = self.shape[0], self.shape[1]
            return v.reshape(out, self.taps, cin).transpose(1, 2).reshape(self.shape)
        return v[:, : self.taps].reshape(self.shape)


@dataclass(frozen=True)
class Candidate:
    """One weight that could be sparsified: where it lives and whether the requested pattern fits it."""

    name: str  # module name, "" for the root module
    module: nn.Module
    param: str  # "weight" or "in_proj_weight"
    kind: str  # "Linear" | "Conv2d" | ... | "MultiheadAttention"
    layout: Layout | None
    reason: str  # "" when eligible

    @property
    def key(self) -> str:
        """The parameter's name in the original state_dict, e.g. ``layer1.0.conv1.weight``."""
        return f"{self.name}.{self.param}" if self.name else self.param

    @property
    def eligible(self) -> bool:
        return not self.reason

    @property
    def weight_shape(self) -> tuple[int, ...]:
        w = getattr(self.module, self.param)
        if isinstance(w, nn.parameter.UninitializedParameter):
            return ()
        return tuple(w.shape)


def _matches(name: str, patterns: Sequence[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Every Linear/Conv/MHA weight of the model, in module order.

    Only these layer types are ever touched: norm layers, embeddings and other modules with a ``.weight``
    are not weight matrices of a GEMM and are never sparsified.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            if module._qkv_same_embed_dim:
                yield name, module, "in_proj_weight"
            else:
                for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    yield name, module, p
        elif isinstance(module, (nn.Linear, *_CONVS, nn.modules.conv._ConvTransposeNd)):
            yield name, module, "weight"


def _kind(module: nn.Module) -> str:
    """The layer's class name, seen through parametrize's generated ``Parametrized<Class>`` wrapper."""
    if isinstance(module, nn.Linear):
        return "Linear"
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls.__name__


def plan(
    model: nn.Module,
    pattern: NM | FanIn | None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    *,
    pad: bool = False,
    ignore_linear: bool = False,
    ignore_grouped: bool = False,
) -> list[Candidate]:
    """Every candidate weight of ``model`` with its layout, or the reason it is skipped for ``pattern``.

    ``include``/``exclude`` are module-name globs (``fnmatch``, e.g. ``"layer4.*"``); ``pattern=None``
    means "any structure" (masks given by the caller, or unstructured DST).
    """
    out = []
    for name, module, param in _weights(model):
        kind = _kind(module)
        w = getattr(module, param, None)
        layout, reason = None, ""
        if w is None or isinstance(w, nn.parameter.UninitializedParameter):
            reason = "weight not initialised (lazy module): run one forward pass first"
        elif isinstance(module, nn.modules.conv._ConvTransposeNd):
            reason = "transposed convolution: not supported"
        elif include is not None and not _matches(name, include):
            reason = "not matched by include"
        elif _matches(name, exclude):
            reason = "excluded by name"
        elif ignore_linear and isinstance(module, nn.Linear):
            reason = "Linear ignored (ignore_linear)"
        elif isinstance(module, _CONVS):
            shape = tuple(w.shape)
            cin = shape[1]
            if ignore_grouped and module.groups > 1:
                reason = "grouped conv ignored (ignore_grouped)"
            elif isinstance(pattern, NM) and cin % pattern.m:
                if pad:
                    layout = Layout("taps", shape)
                elif cin == 1 and module.groups > 1:
                    reason = (
                        f"depthwise conv: 1 input channel per group, N:M needs a multiple of {pattern.m} "
                        "(pad=True pads taps)"
                    )
                else:
                    reason = f"{cin} input channels per group, not a multiple of {pattern.m} (pad=True pads taps)"
            else:
                layout = Layout("conv", shape)
        else:
            shape = tuple(w.shape)
            if isinstance(pattern, NM) and shape[1] % pattern.m:
                reason = f"{shape[1]} input features, not a multiple of {pattern.m}"
            else:
                layout = Layout("rows", shape)
        if layout is not None and isinstance(pattern, FanIn):
            fan_in = math.prod(layout.shape[1:])
            if pattern.k(fan_in) >= fan_in:
                layout, reason = None, f"fan-in {fan_in}: sparsity {pattern.sparsity:g} keeps every weight"
        out.append(Candidate(name, module, param, kind, layout, reason))
    return out
