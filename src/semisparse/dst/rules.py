"""The prune/grow rule of a DST method as an object: its initial mask, its update, its target.

:class:`~.dynamic.DynamicSparsity` holds one rule, chosen once by a factory in :mod:`.api`, and asks it
three things per layer: where the layer starts (:meth:`Rule.start`: a random mask meeting the budget, or
None to keep it dense), how it changes at an update (:meth:`Rule.update`, with :mod:`.prune_grow`'s vectorised
prune/grow functions), and what structure ``ss.check`` verifies (the ``target`` both return).

* :class:`Unstructured` - RigL: a per-layer weight count, anywhere in the layer;
* :class:`ConstantFanIn` - SRigL: exactly ``k`` weights per active neuron, neurons ablated below
  ``ablation * k`` salient weights and their budget shared by the rest;
* :class:`NMGroups` - SRigL's N:M variant: prune and regrow inside each group of M.

A rule's ``name`` is what the scheduler's ``state_dict`` records (``"rigl"``, ``"srigl"``, ``"nm"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..layout import Candidate, Layout
from ..masking.parametrization import Mask, Target
from ..patterns import NM, fanin_mask, nm_mask
from . import checks, prune_grow
from .budgets import LayerBudget, count_budgets, fanin_budgets
from .selection import as_globs, matches

View = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class SparseLayer:
    """One weight under dynamic sparsity. ``budget``: weights it may keep; ``k0``: fan-in before ablation."""

    key: str
    module: nn.Module
    param: str
    layout: Layout
    mask: Mask
    budget: int
    k0: int | None
    ablate: bool

    @property
    def original(self) -> nn.Parameter:
        return self.module.parametrizations[self.param].original



@dataclass(frozen=True)
class Start:
    """A layer's initial topology: its ``(rows, width)`` mask view, weight budget and fan-in ``k0``."""

    mask: torch.Tensor
    budget: int
    k0: int | None = None


class Rule:
    """Base of the rules: unstructured defaults, each subclass overrides what differs."""

    name: ClassVar[str]

    @property
    def pattern(self) -> NM | None:
        """The N:M pattern layers must be able to take (eligibility), None for any layer."""
        return None

    def sparsity(self, budget: LayerBudget | None) -> float:
        return budget.sparsity

    def densities(self, shapes: Sequence[tuple[int, ...]], budget: LayerBudget | None) -> list[float]:
        return budget.densities(shapes)

    def start(self, scores: torch.Tensor, density: float) -> Start | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def target(self, start: Start) -> Target:
        return None

    def ablates(self, c: Candidate, classifier: Candidate) -> bool:
        return False

    def view(self, layer: SparseLayer) -> View:
        """Weight-shaped -> the ``(rows, K)`` form the update works on, and back. Fan-in and unstructured
        rules ignore the order inside a row: a free reshape."""
        shape = layer.mask.mask.shape
        return (lambda t: t.reshape(shape[0], -1)), (lambda v: v.reshape(shape))

    def update(self, layer: SparseLayer, mask: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
               drop_fraction: float) -> tuple[torch.Tensor, Target]:  # pragma: no cover - abstract
        """The new ``(rows, K)`` mask and its target, from the viewed mask, weight and dense gradient."""
        raise NotImplementedError

    def restore(self, layer: SparseLayer, saved: dict) -> None:
        """Put back what the scheduler's ``state_dict`` recorded for ``layer`` beyond the mask buffer."""


@dataclass(frozen=True)
class Unstructured(Rule):
    """RigL: keep the layer's weight count; drop the lowest |w|, grow the highest |dense gradient|."""

    name: ClassVar[str] = "rigl"

    def start(self, scores: torch.Tensor, density: float) -> Start | None:
        budget = count_budgets([tuple(scores.shape)], [density])[0]
        if budget >= scores.numel():
            return None
        return Start(prune_grow.top_in_layer(scores, budget), budget)

    def update(self, layer, mask, weight, grad, drop_fraction):
        return prune_grow.rigl_update(mask, weight, grad, drop_fraction), None


@dataclass(frozen=True)
class ConstantFanIn(Rule):
    """SRigL: ``k`` weights per active neuron; neurons with fewer than ``ablation * k`` salient weights are
    ablated (never the classifier or ``no_ablation`` modules) and their budget goes to the others."""

    ablation: float = 0.3
    no_ablation: tuple[str, ...] = ()
    name: ClassVar[str] = "srigl"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ablation", checks.number("ablation", self.ablation, 0.0, 1.0, example="0.3"))
        object.__setattr__(self, "no_ablation", as_globs(self.no_ablation, "no_ablation"))

    def start(self, scores: torch.Tensor, density: float) -> Start | None:
        # The layer's budget is floor(d * numel); neurons start at k0 = floor(d * fan_in) each, and
        # ablation hands the budget of ablated neurons (and the rounding slack) to the others.
        shape = tuple(scores.shape)
        k0 = fanin_budgets([shape], [density])[0]
        if k0 >= shape[1]:
            return None
        return Start(fanin_mask(scores, k0), max(k0 * shape[0], count_budgets([shape], [density])[0]), k0)

    def target(self, start: Start) -> Target:
        return start.k0

    def ablates(self, c: Candidate, classifier: Candidate) -> bool:
        return c is not classifier and not matches(c, self.no_ablation)

    def update(self, layer, mask, weight, grad, drop_fraction):
        threshold = max(1, int(self.ablation * layer.k0)) if self.ablation > 0 else 0
        return prune_grow.srigl_update(mask, weight, grad, drop_fraction, layer.budget, threshold, layer.ablate)

    def restore(self, layer: SparseLayer, saved: dict) -> None:
        layer.mask.target = int(saved["k"])


@dataclass(frozen=True)
class NMGroups(Rule):
    """N:M throughout: prune and regrow inside each group of M (always valid N:M, no ablation)."""

    nm: NM
    name: ClassVar[str] = "nm"

    @property
    def pattern(self) -> NM:
        return self.nm

    def sparsity(self, budget: LayerBudget | None) -> float:
        return 1.0 - self.nm.density

    def densities(self, shapes, budget):
        return [self.nm.density] * len(shapes)

    def start(self, scores: torch.Tensor, density: float) -> Start:
        rows, width = scores.shape
        return Start(nm_mask(scores, self.nm.n, self.nm.m), rows * width * self.nm.n // self.nm.m)

    def target(self, start: Start) -> Target:
        return self.nm

    def view(self, layer: SparseLayer) -> View:
        return layer.layout.to_view, layer.layout.from_view  # groups of M run along input channels

    def update(self, layer, mask, weight, grad, drop_fraction):
        return prune_grow.nm_update(mask, weight, grad, drop_fraction, self.nm.n, self.nm.m), self.nm
