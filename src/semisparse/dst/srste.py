"""SR-STE (Zhou et al. 2021): N:M sparsity trained from scratch.

The magnitude N:M mask of the dense weight is recomputed after every optimizer step; the forward uses
``w * mask``; the backward is straight-through - the dense weight receives the full gradient of the
effective weight - plus a decay on the pruned weights only: ``grad + decay * (~mask) * w`` ("sparse-refined"
STE). Both live in the parametrization (:class:`STEMask`, a :class:`~semisparse.masking.Mask` so
``ss.masks``/``ss.check``/``ss.finalize`` treat it like any mask), not in a hook.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SemisparseError
from ..layout import Layout
from ..masking.parametrization import Mask, attach
from ..patterns import NM, nm_mask, parse_pattern
from . import checks
from .selection import LayerSelection, select_layers


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        if ctx.decay:
            grad = grad + ctx.decay * weight.masked_fill(mask, 0)
        return grad, None, None


class STEMask(Mask):
    """``w * mask`` forward, straight-through backward with ``decay`` on the pruned weights."""

    def __init__(self, mask: torch.Tensor, layout: Layout, target: NM, decay: float) -> None:
        super().__init__(mask, layout, target)
        self.decay = float(decay)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(weight, self.mask, self.decay)


#: The default decay on the pruned weights (the SR-STE paper's lambda_w).
DECAY = 2e-4


def nm_pattern(pattern: object, what: str) -> NM:
    """``pattern`` ("N:M" or an :class:`NM`) as an :class:`NM`, or one line saying ``what`` needs one."""
    nm = parse_pattern(pattern)
    if not isinstance(nm, NM):
        raise SemisparseError(f'{what} needs an N:M pattern such as "2:4", got {pattern!r}')
    return nm


class SRSTE:
    """N:M from scratch: call :meth:`step` after every ``optimizer.step()`` to recompute the masks.

    Opens as :class:`~.dynamic.DynamicSparsity` does (:func:`~.selection.select_layers`: the plain model, no
    masks yet, eligible layers, an optimizer holding them) before it changes anything."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, pattern: str | NM = "2:4",
                 decay: float = DECAY, *, layers: LayerSelection | None = None) -> None:
        nm = nm_pattern(pattern, "SR-STE")
        decay = checks.number("decay", decay, 0.0, example="2e-4")
        sel = select_layers(model, optimizer, nm, "SR-STE", layers)
        eligible = sel.budgeted
        self.model, self.optimizer, self.pattern, self.decay = model, optimizer, nm, float(decay)
        self._step = 0
        self.masks: list[tuple[STEMask, nn.Module, str]] = []
        for c in eligible:
            w = getattr(c.module, c.param).detach()
            mask = c.layout.from_view(nm_mask(c.layout.to_view(w.abs()), nm.n, nm.m))
            p = STEMask(mask, c.layout, nm, self.decay)
            attach(c.module, c.param, p)
            self.masks.append((p, c.module, c.param))

    @torch.no_grad()
    def step(self, stepped: bool = True) -> bool:
        """Recompute every mask from the magnitudes of the dense weights. Returns True (always updates);
        ``stepped=False`` (the optimizer skipped the step: fp16 overflow): nothing changes, nothing counts."""
        if not stepped:
            return False
        self._step += 1
        for p, module, param in self.masks:
            w = module.parametrizations[param].original
            p.mask.copy_(p.layout.from_view(nm_mask(p.layout.to_view(w.abs()), self.pattern.n, self.pattern.m)))
        return True

    @property
    def step_count(self) -> int:
        return self._step

    def state_dict(self) -> dict:
        return {"rule": "sr-ste", "step": self._step, "pattern": str(self.pattern), "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rule") != "sr-ste" or state.get("pattern") != str(self.pattern):
            raise SemisparseError(f"state_dict is not an SR-STE {self.pattern} state: {state.get('rule')!r}")
        self._step = int(state["step"])

    def __repr__(self) -> str:
        return f"SRSTE(pattern={self.pattern}, decay={self.decay}, layers={len(self.masks)}, step={self._step})"
