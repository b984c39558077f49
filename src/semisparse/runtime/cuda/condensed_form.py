"""The Triton condensed form: constant fan-in layers on CUDA (:mod:`.kernels`), as a planner form.

``import semisparse.runtime.cuda`` registers it as ``"triton-condensed"`` in :data:`~.layers.FORMS`, next to
dense and cuSPARSELt. It applies to Linear layers, MHA projections (the packed QKV is a Linear on the
``(..., E)`` input) and 1x1 convolutions of one group (a strided one is subsampled first, as
:class:`~.forms.Conv1x1` does; channels-last activations are read and written through strides, no copies),
in fp32, bf16 and fp16: unlike the 2:4 path it needs no 16-bit type. The mask decides, not the name: any
mask except a declared N:M pattern (those are 2:4's business) is condensed, rows padded to the largest
fan-in, so SRigL masks given as plain tensors (pattern "unstructured") and the second Linear of a folded
pair (whose rows lost their ablated inputs) qualify. Ablated neurons (all-zero mask rows) are not
computed; their output is their bias, as on CPU.

The form is *tunable*: :meth:`CondensedForm.candidates` lists the kernel configs worth timing for an input,
:meth:`CondensedForm.use_config` fixes one. The planner (:func:`~.planner.plan_layers`) times every config
as a candidate under the same conditions as dense, checks the fastest against dense, and keeps it;
a saved plan records it (:mod:`.plan_io`).

The kernels run on CUDA tensors, or on CPU under the Triton interpreter (``TRITON_INTERPRET=1``; tests,
``--smoke``); elsewhere the form is left out with the reason.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from . import kernels as tc
from .eligibility import LayerSpec
from .layers import register_form

NAME = "triton-condensed"


def _is_nm(pattern: str) -> bool:
    return ":" in pattern


def condensed_reason(spec: LayerSpec) -> str:
    """"" when the condensed Triton form can run ``spec`` here; else why not (a report's "skipped because").

    N:M layers get "" too and no form: they run the 2:4 path, and the 2:4 reason explains them."""
    if _is_nm(spec.pattern):
        return ""
    if tc.triton is None:
        return "triton is not installed: no condensed GPU kernel"
    dev = spec.weight.device
    if dev.type != "cuda" and not tc.interpreting():
        return f"condensed Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), not {dev.type}"
    if spec.kind not in ("Linear", "MultiheadAttention", "Conv2d"):
        return f"{spec.kind}: the condensed GPU kernel runs Linear, MHA projections and 1x1 convs"
    if spec.kind == "Conv2d":
        c = spec.conv
        if spec.shape[2:] != (1, 1):
            return f"{spec.shape[2]}x{spec.shape[3]} conv: the condensed GPU kernel runs 1x1 convs only"
        if c.get("groups", 1) != 1:
            return "grouped 1x1 conv: no condensed GPU kernel"
        if c.get("padding", 0) not in (0, (0, 0), "valid"):
            return f"1x1 conv with padding {c.get('padding')}: no condensed GPU kernel"
    return ""


def applies(spec: LayerSpec) -> bool:
    return not _is_nm(spec.pattern) and not condensed_reason(spec)


class CondensedForm(nn.Module):
    """A Triton condensed layer (Linear or 1x1 conv), with the stride subsampling of a strided 1x1 conv."""

    def __init__(self, layer: tc.TritonCondensedLinear, stride: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        self.layer = layer
        self.stride = tuple(stride)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        return x[:, :, ::sh, ::sw] if (sh > 1 or sw > 1) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self._input(x))

    @property
    def config(self) -> tc.KernelConfig | None:
        return self.layer.config

    def config_json(self) -> dict | None:
        return config_dict(self.layer.config)

    def candidates(self, x: torch.Tensor) -> list[tc.KernelConfig]:
        """The kernel configs the planner times for input ``x`` (the layer's own, at this input's batch)."""
        return tc.candidates(self.layer, self._input(x))

    def use_config(self, config: tc.KernelConfig | dict | None) -> None:
        """Run with ``config`` (a :class:`KernelConfig`, its :func:`config_dict`, or None: heuristic)."""
        self.layer.use_config(config_from(config))


def config_dict(config: tc.KernelConfig | None) -> dict | None:
    """A config as plain JSON (what a saved plan keeps)."""
    return None if config is None else asdict(config)


def config_from(value: tc.KernelConfig | dict | None) -> tc.KernelConfig | None:
    if value is None or isinstance(value, tc.KernelConfig):
        return value
    return tc.KernelConfig(**value)


def build_condensed(spec: LayerSpec, backend) -> nn.Module | None:
    """The form for ``spec`` (``backend`` unused: the kernel is Triton's), or None where it does not apply."""
    if not applies(spec):
        return None
    if spec.kind == "Conv2d":
        out = spec.shape[0]
        w, mask = spec.weight.reshape(out, -1, 1, 1).contiguous(), spec.mask.reshape(out, -1, 1, 1)
        layer = tc.TritonCondensedConv(w, mask, spec.bias)
        stride = spec.conv.get("stride", 1)
        return CondensedForm(layer, (stride, stride) if isinstance(stride, int) else stride)
    return CondensedForm(tc.TritonCondensedLinear(spec.weight, spec.mask, spec.bias))


register_form(NAME, build_condensed, sparse=True, why=condensed_reason)
