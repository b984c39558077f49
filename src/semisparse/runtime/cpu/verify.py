"""Checking a deployed model against the masked model it came from, before it is returned.

Each rewrite deploy makes (BatchNorm folding, ablated-neuron removal, module swaps) is local, but a model may
see more than the rewrite did: a layer also reached through a plain list, an activation read outside the
chain, a traced graph that fixed one branch. So the whole deployed model is run on the example input and on
a second one (other values, one more sample where the model takes it) and compared with the masked model; a
difference undoes the rewrite (:func:`semisparse.runtime.deploy`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..timing import run

__all__ = ["reference", "second_input", "Checks", "difference"]

#: Largest |deployed - masked| relative to the largest |masked| of an output accepted as fp32 rounding.
RTOL = 1e-3


def reference(model: nn.Module) -> nn.Module:
    """The masked model as the user runs it: an fp32 eval copy on the CPU, masks as they are."""
    ref = copy.deepcopy(model).cpu().float().eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _perturb(x, g: torch.Generator, grow: bool):
    if isinstance(x, torch.Tensor):
        if grow and x.dim() >= 1 and x.shape[0] >= 1:
            x = torch.cat([x, x[:1]])
        if x.is_floating_point() and x.numel():
            noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)
            scale = float(x.float().std()) if x.numel() > 1 else 1.0
            return x + noise * (0.5 * (scale if scale > 0 else 1.0))
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_perturb(t, g, grow) for t in x)
    if isinstance(x, dict):
        return {k: _perturb(v, g, grow) for k, v in x.items()}
    return x


def second_input(x, grow: bool = True):
    """``x`` with other values (and, ``grow``, one more sample along the first dimension), seeded."""
    return _perturb(x, torch.Generator().manual_seed(1234), grow)


def _tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return [out]


def difference(out, ref, rtol: float = RTOL) -> str:
    """"" when ``out`` equals ``ref`` within fp32 rounding (same structure, shapes, dtypes), else what differs."""
    a, b = _tensors(out), _tensors(ref)
    if len(a) != len(b):
        return f"{len(a)} outputs instead of {len(b)}"
    for i, (u, v) in enumerate(zip(a, b)):
        if not isinstance(v, torch.Tensor):
            if isinstance(u, torch.Tensor) or u != v:
                return f"output {i} differs"
            continue
        if not isinstance(u, torch.Tensor) or u.shape != v.shape:
            return f"output {i} has shape {tuple(getattr(u, 'shape', ()))} instead of {tuple(v.shape)}"
        if not v.is_floating_point():
            if not torch.equal(u.to(v.dtype), v):
                return f"output {i} differs"
            continue
        u, v = u.detach().float(), v.detach().float()
        if not torch.equal(torch.isnan(u), torch.isnan(v)):
            return f"output {i} has NaNs where the masked model has none (or the reverse)"
        fin = ~torch.isnan(v)
        if not fin.any():
            continue
        scale = float(v[fin].abs().max().clamp_min(1e-12)) if v[fin].isfinite().any() else 1.0
        err = float((u[fin] - v[fin]).abs().nan_to_num(posinf=float("inf")).max()) / scale
        if not err <= rtol:
            return f"output {i} differs from the masked model's by {err:.2g} (relative)"
    return ""


class Checks:
    """The inputs a deployed model is checked on and the masked model's outputs for them."""

    def __init__(self, ref: nn.Module, x, grow: bool = True) -> None:
        """Runs ``ref`` on ``x`` (its errors propagate: the input does not fit the model) and on a second
        input (``grow``: one sample more if the model takes it; else, or if not, the same shape)."""
        with torch.no_grad():
            self.cases = [(x, run(ref, x))]
            for more in (True, False) if grow else (False,):
                x2 = second_input(x, more)
                try:
                    self.cases.append((x2, run(ref, x2)))
                    break
                except Exception:  # noqa: BLE001 - the model takes only this shape: check the same shape again
                    continue

    def mismatch(self, model: nn.Module) -> str:
        """"" when ``model`` computes the masked model's outputs on every input, else why not (one line)."""
        with torch.no_grad():
            for i, (x, want) in enumerate(self.cases):
                which = "the example input" if i == 0 else "a second input"
                try:
                    got = run(model, x)
                except Exception as exc:  # noqa: BLE001 - any failure of the rewritten model is a mismatch
                    first = (str(exc).strip().splitlines() or [""])[0][:160]
                    return f"fails on {which} ({type(exc).__name__}: {first})"
                why = difference(got, want)
                if why:
                    return f"{why} on {which}"
        return ""
