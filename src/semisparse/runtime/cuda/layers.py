"""A deployed layer that holds several candidate forms and runs the one the planner chose.

Forms come from a small registry (:data:`FORMS`): each entry builds a module for a :class:`LayerSpec`, or
``None`` where it does not apply. The built-in ones are torch's dense layer, 1x1 convs as a dense GEMM,
and the cuSPARSELt forms of :mod:`.forms`. Another kernel plugs in with :func:`register_form`; for example
the Triton condensed kernel for constant fan-in masks (:mod:`.kernels`) would register::

    register_form("condensed", build_condensed, sparse=True)   # build_condensed(spec, backend) -> module | None

and the planner then times it against dense like every other form, under the same conditions
(:mod:`.condensed_form` does exactly that). A form whose module has ``candidates(x)`` and
``use_config(cfg)`` is *tunable*: the planner times each of its configs as a candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import SemisparseError
from ...masking.coverage import LayerReport
from .eligibility import LayerSpec, mask_digest, out_padding_note, sparse_reason
from .forms import (
    Conv1x1,
    ConvIm2col,
    ConvTaps,
    DenseConv,
    DenseGemm,
    LinearForm,
    SparseGemm,
    im2col_weight,
    tap_weights,
)


@dataclass(frozen=True)
class Form:
    """A way to run a layer. ``sparse``: it uses the mask (timed against the best dense form)."""

    name: str
    build: Callable[[LayerSpec, object], nn.Module | None]
    sparse: bool
    why: Callable[[LayerSpec], str] | None = None  # why it cannot run a layer it is meant for ("" if it can)


#: The registry, in build order. Names are unique.
FORMS: list[Form] = []


def register_form(name: str, build: Callable[[LayerSpec, object], nn.Module | None], sparse: bool = True,
                  why: Callable[[LayerSpec], str] | None = None) -> None:
    """Add (or replace) a form; ``build(spec, backend)`` returns its module or ``None`` where it does not apply;
    ``why(spec)``, if given, says why it does not (shown in the report when a layer gets no sparse form)."""
    FORMS[:] = [f for f in FORMS if f.name != name] + [Form(name, build, sparse, why)]


def _is_1x1(spec: LayerSpec) -> bool:
    c = spec.conv
    pad = c.get("padding", 0)
    return spec.shape[2:] == (1, 1) and c.get("groups", 1) == 1 and pad in (0, (0, 0))


def _dense(spec: LayerSpec, backend) -> nn.Module:
    if spec.kind == "Conv2d":
        return DenseConv(spec.weight, spec.bias, spec.conv)
    return LinearForm(DenseGemm(spec.weight, spec.bias))


def _dense_gemm(spec: LayerSpec, backend) -> nn.Module | None:
    if spec.kind != "Conv2d" or not _is_1x1(spec):
        return None
    return Conv1x1(DenseGemm(spec.weight.reshape(spec.shape[0], -1), spec.bias), spec.conv)


def _cusparselt(spec: LayerSpec, backend) -> nn.Module | None:
    if sparse_reason(spec):
        return None
    if spec.kind == "Conv2d":
        if not _is_1x1(spec):
            return None
        return Conv1x1(SparseGemm(spec.weight.reshape(spec.shape[0], -1), spec.bias, backend), spec.conv)
    return LinearForm(SparseGemm(spec.weight, spec.bias, backend))


def _cusparselt_taps(spec: LayerSpec, backend) -> nn.Module | None:
    if spec.kind != "Conv2d" or _is_1x1(spec) or sparse_reason(spec):
        return None
    gemms = [SparseGemm(w, spec.bias if i == 0 else None, backend) for i, w in enumerate(tap_weights(spec.weight))]
    return ConvTaps(gemms, spec.shape[2:], spec.conv)


def _cusparselt_im2col(spec: LayerSpec, backend) -> nn.Module | None:
    if spec.kind != "Conv2d" or _is_1x1(spec) or sparse_reason(spec):
        return None
    return ConvIm2col(SparseGemm(im2col_weight(spec.weight), spec.bias, backend), spec.shape[2:], spec.conv)


register_form("dense", _dense, sparse=False)
register_form("dense-gemm", _dense_gemm, sparse=False)
register_form("cusparselt", _cusparselt)
register_form("cusparselt-taps", _cusparselt_taps)
register_form("cusparselt-im2col", _cusparselt_im2col)


def is_sparse_form(name: str) -> bool:
    return any(f.name == name and f.sparse for f in FORMS)


class PlannedLayer(nn.Module):
    """One masked layer with its candidate forms (``forms``) and the chosen one (``choice``).

    ``figures`` holds the planner's measurements (microseconds per form, the ratio of the best dense form
    over the chosen one); ``reason`` says why no sparse form exists (fp32, not 2:4, sizes...).
    """

    def __init__(self, spec: LayerSpec, backend, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()
                 ) -> None:
        super().__init__()
        self.key, self.kind, self.pattern = spec.key, spec.kind, spec.pattern
        self.shape = spec.shape
        self.density = spec.density
        self.mask_digest = mask_digest(spec.mask)
        self.reason = sparse_reason(spec)
        self.notes = list(spec.notes)
        if not self.reason:
            note = out_padding_note(spec.shape[0])
            if note:
                self.notes.append(note)
        forms = {}
        for f in FORMS:
            if (only is not None and f.name not in only) or f.name in skip:
                continue
            try:
                mod = f.build(spec, backend)
            except RuntimeError as exc:  # the kernel refused this layer (shape, alignment): leave the form out
                self.notes.append(f"{f.name} unavailable: {str(exc).splitlines()[0][:120] if str(exc) else exc}")
                continue
            if mod is not None:
                forms[f.name] = mod
        if not forms:
            raise SemisparseError(f"{spec.key}: none of the forms {only} can run this layer here ({self.reason})")
        self.forms = nn.ModuleDict(forms)
        if self.sparse_forms:
            self.reason = ""  # some sparse form runs it (e.g. a condensed kernel for a non-2:4 mask)
        else:
            whys = [f.why(spec) for f in FORMS if f.sparse and f.why is not None and f.name not in skip]
            self.reason = "; ".join(dict.fromkeys(r for r in [self.reason, *whys] if r))
        self.timings: dict = {}
        self.choice = "dense" if "dense" in forms else next(iter(forms))
        self.dense_choice = self.choice  # the best dense form (what a revert goes back to)
        self.figures: dict = {}
        self._macs = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forms[self.choice](x)

    @property
    def sparse_forms(self) -> list[str]:
        return [n for n in self.forms if is_sparse_form(n)]

    @property
    def is_sparse(self) -> bool:
        return is_sparse_form(self.choice)

    def choose(self, name: str) -> None:
        if name not in self.forms:
            raise KeyError(f"{self.key}: no form {name!r} (has {list(self.forms)})")
        self.choice = name

    def drop_unused(self) -> None:
        """Keep the chosen form and the best dense one (what the whole-model check may revert to)."""
        for name in list(self.forms):
            if name not in (self.choice, self.dense_choice):
                del self.forms[name]

    def alg_ids(self) -> dict[str, list]:
        """``{form: [alg id of each cuSPARSELt GEMM in it]}`` (what a saved plan keeps)."""
        out = {}
        for name, form in self.forms.items():
            ids = [m.alg_id for m in form.modules() if isinstance(m, SparseGemm)]
            if ids:
                out[name] = ids
        return out

    def set_alg_ids(self, ids: dict[str, list]) -> None:
        for name, vals in ids.items():
            if name in self.forms:
                gemms = [m for m in self.forms[name].modules() if isinstance(m, SparseGemm)]
                for g, v in zip(gemms, vals):
                    g.alg_id = None if v is None else int(v)

    def kernel_configs(self) -> dict[str, dict]:
        """``{form: its kernel config as JSON}`` for tunable forms with a config set (what a saved plan keeps)."""
        out = {}
        for name, form in self.forms.items():
            to_json = getattr(form, "config_json", None)
            if callable(to_json) and to_json() is not None:
                out[name] = to_json()
        return out

    def set_kernel_configs(self, configs: dict[str, dict]) -> None:
        for name, cfg in configs.items():
            if name in self.forms and callable(getattr(self.forms[name], "use_config", None)):
                self.forms[name].use_config(cfg)

    def semisparse_layer_report(self, name: str) -> LayerReport:
        why = self.figures.get("why", "")
        if not self.is_sparse and not why:
            why = self.reason
        extra = {"kernel": self.choice, **{k: v for k, v in self.figures.items() if k != "why"}}
        if self.notes:
            extra["notes"] = "; ".join(self.notes)
        return LayerReport(self.key, self.kind, self.shape, self.pattern, self.density, math.prod(self.shape),
                           macs=self._macs, reason=why, extra=extra)
