"""Layer budgets: how many weights each sparsified layer keeps so the whole set meets a target sparsity.

* **uniform** - every layer keeps the share ``1 - s``.
* **ERK** (Erdos-Renyi-Kernel, Evci et al. 2020) - a layer of shape ``(out, in, kh, kw)`` keeps a share
  proportional to ``((out + in + kh + kw) / (out * in * kh * kw)) ** power_scale``; a layer whose share
  would pass 1 is made dense and the others absorb its surplus, so the kept total over the budgeted layers
  is ``(1 - s) * sum(numel)`` exactly, before rounding.

Shapes are plain tuples (the weight's shape). Densities are floats in (0, 1]. Per-layer counts are
floored (:func:`fanin_budgets`), so the achieved sparsity is at least the target, by less than a weight per
neuron; :class:`~semisparse.dst.dynamic.DynamicSparsity` reports the achieved figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from . import checks

DISTRIBUTIONS = ("erk", "uniform")


def check_sparsity(sparsity: object) -> float:
    """``sparsity`` as a float in (0, 1), or a one-line :class:`~.checks.ArgumentError`."""
    return checks.number("sparsity", sparsity, 0.0, 1.0, open_lo=True, open_hi=True, example="0.9")


def uniform_densities(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[float]:
    """Every layer keeps ``1 - sparsity`` of its weights."""
    s = check_sparsity(sparsity)
    return [1.0 - s for _ in shapes]


def erk_densities(shapes: Sequence[tuple[int, ...]], sparsity: float, power_scale: float = 1.0) -> list[float]:
    """ERK densities: ``d_l = min(1, eps * raw_l)`` with ``eps`` solving ``sum d_l n_l = (1 - s) sum n_l``.

    ``raw_l = (sum(shape) / prod(shape)) ** power_scale``. Layers pushed past density 1 are fixed dense and
    ``eps`` is solved again over the rest (the RigL procedure), so the total is exact.
    """
    return _erk(shapes, check_sparsity(sparsity), power_scale)


def _erk(shapes: Sequence[tuple[int, ...]], s: float, power_scale: float) -> list[float]:
    """:func:`erk_densities` of a sparsity ``s`` already checked."""
    if not shapes:
        return []
    numel = [math.prod(sh) for sh in shapes]
    raw = [(sum(sh) / math.prod(sh)) ** power_scale for sh in shapes]
    target = (1.0 - s) * sum(numel)
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(shapes)) if i not in dense]
        if not rest:
            return [1.0] * len(shapes)
        budget = target - sum(numel[i] for i in dense)
        eps = budget / sum(raw[i] * numel[i] for i in rest)
        over = [i for i in rest if eps * raw[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense.add(max(over, key=lambda i: raw[i]))


def layer_densities(
    shapes: Sequence[tuple[int, ...]], sparsity: float, distribution: str = "erk", power_scale: float = 1.0
) -> list[float]:
    """Densities under ``distribution`` ("erk" | "uniform")."""
    return LayerBudget(sparsity, distribution, power_scale).densities(shapes)


def fanin_budgets(shapes: Sequence[tuple[int, ...]], densities: Sequence[float]) -> list[int]:
    """Weights kept per output neuron: ``max(1, floor(d * fan_in))`` (fan_in = prod(shape[1:]))."""
    out = []
    for sh, d in zip(shapes, densities):
        fan_in = math.prod(sh[1:])
        out.append(max(1, min(fan_in, math.floor(d * fan_in + 1e-9))))
    return out


def count_budgets(shapes: Sequence[tuple[int, ...]], densities: Sequence[float]) -> list[int]:
    """Weights kept per layer (unstructured): ``max(1, floor(d * numel))``."""
    return [max(1, min(math.prod(sh), math.floor(d * math.prod(sh) + 1e-9))) for sh, d in zip(shapes, densities)]


@dataclass(frozen=True)
class LayerBudget:
    """How much each layer may keep: an overall ``sparsity`` shared out by ``distribution`` (uniform or ERK).

    Its three values are checked here, once; the densities below take them as they are."""

    sparsity: float
    distribution: str = "erk"
    erk_power_scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        checks.choice("distribution", self.distribution, DISTRIBUTIONS)
        checks.number("erk_power_scale", self.erk_power_scale, 0.0, example="1 for ERK, 0 for uniform")

    def densities(self, shapes: Sequence[tuple[int, ...]]) -> list[float]:
        """Per-layer densities of ``shapes`` (weight shapes, in order)."""
        if self.distribution == "uniform":
            return [1.0 - self.sparsity for _ in shapes]
        return _erk(shapes, self.sparsity, self.erk_power_scale)
