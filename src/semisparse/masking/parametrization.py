"""The mask parametrization and how to find it again on a model.

A sparsified weight is an ordinary ``torch.nn.utils.parametrize`` parametrization, as in
``torch.ao.pruning``: ``module.weight`` computes ``original * mask`` on access, the dense ``original``
stays underneath (never zeroed, so masks can change or be removed), and the model keeps working with
``state_dict``, DDP and ``torch.compile``.

State-dict keys of a sparsified ``conv1.weight``::

    conv1.parametrizations.weight.original   # the dense weight
    conv1.parametrizations.weight.0.mask     # bool mask, the weight's shape

(``ss.masks`` and ``ss.finalize`` translate back to the original ``conv1.weight`` name.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..layout import Layout
from ..patterns import NM, check_view

#: What a layer's mask must satisfy: N:M, a constant fan-in k per neuron (int), or None (unstructured).
Target = NM | int | None


class SparseParametrization(nn.Module):
    """Base of every semisparse parametrization: knows its layout and its target structure.

    Subclasses implement :meth:`hard_mask` (the deterministic bool mask, weight-shaped) and ``forward``.
    """

    def __init__(self, layout: Layout, target: Target) -> None:
        super().__init__()
        self.layout = layout
        self.target = target

    def hard_mask(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def pattern_name(self) -> str:
        t = self.target
        if isinstance(t, NM):
            return str(t)
        if isinstance(t, int):
            return f"fan-in {t}"
        return "unstructured"

    def check(self, where: str) -> None:
        """Raise :class:`~semisparse.PatternError` if the current hard mask breaks ``target``."""
        mask = self.hard_mask()
        if isinstance(self.target, NM):
            if self.layout.mode == "taps":
                _check_padded(mask, self.layout, self.target, where)
            else:
                check_view(self.layout.to_view(mask), self.target, where)
        elif isinstance(self.target, int):
            check_view(self.layout.to_view(mask), self.target, where)


def _check_padded(mask: torch.Tensor, layout: Layout, nm: NM, where: str) -> None:
    """Padded layouts keep ``min(N, real weights)`` real entries per group of M kernel taps."""
    from ..errors import PatternError

    view = layout.to_view(mask, nm.m, fill=False).reshape(-1, nm.m)
    real = layout.to_view(torch.ones_like(mask), nm.m, fill=False).reshape(-1, nm.m).sum(-1)
    if not bool((view.sum(-1) == real.clamp(max=nm.n)).all()):
        raise PatternError(f"{where}: padded mask is not {nm} along kernel taps")


class Mask(SparseParametrization):
    """``weight = original * mask`` with a fixed bool mask buffer (magnitude, random, given, DST)."""

    def __init__(self, mask: torch.Tensor, layout: Layout, target: Target) -> None:
        super().__init__(layout, target)
        self.register_buffer("mask", mask.to(torch.bool).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    def hard_mask(self) -> torch.Tensor:
        return self.mask


@dataclass(frozen=True)
class SparseWeight:
    """A sparsified weight found on a model."""

    name: str  # module name
    module: nn.Module
    param: str
    parametrization: SparseParametrization

    @property
    def key(self) -> str:
        return f"{self.name}.{self.param}" if self.name else self.param

    @property
    def original(self) -> torch.Tensor:
        """The dense weight underneath the mask (an ``nn.Parameter``)."""
        return self.module.parametrizations[self.param].original


def sparse_weights(model: nn.Module) -> Iterator[SparseWeight]:
    """Every weight of ``model`` that carries a semisparse parametrization, in module order."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, SparseParametrization):
                    yield SparseWeight(name, module, param, p)


def is_sparsified(model: nn.Module) -> bool:
    return next(sparse_weights(model), None) is not None
