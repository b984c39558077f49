"""Short factories: each method is a combination of budget x schedule x rule (see :class:`DynamicSparsity`).

RigL = ``LayerBudget`` x ``UpdateSchedule`` x :class:`~.rules.Unstructured`; SRigL the same with
:class:`~.rules.ConstantFanIn` (or :class:`~.rules.NMGroups` for ``pattern="N:M"``).

``ss.RigL`` / ``ss.SRigL`` / ``ss.SRSTE`` are the public names; :func:`from_flags` maps the ``semisparse
train`` flags (``--dst --sparsity-level --delta --alpha --t-end FRACTION ...``) onto them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import SemisparseError
from ..patterns import NM, parse_pattern
from .budgets import LayerBudget
from .dynamic import DynamicSparsity
from .rules import ConstantFanIn, NMGroups, Unstructured
from .schedule import UpdateSchedule
from .selection import as_globs
from .srste import SRSTE as _SRSTE

DST_METHODS = ("rigl", "srigl", "sr-ste", "static")


def RigL(  # noqa: N802 - public name of the method
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsity: float = 0.9,
    t_end: int | None = None,
    *,
    distribution: str = "erk",
    delta: int = 100,
    alpha: float = 0.3,
    dense_layers: Sequence[str] | str = (),
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    ignore_linear: bool = False,
    ignore_grouped: bool = False,
    erk_power_scale: float = 1.0,
    static: bool = False,
    sparse_init: bool = True,
    init_gain: float = math.sqrt(2.0),
    seed: int = 0,
    grad_steps: int = 1,
) -> DynamicSparsity:
    """RigL (Evci et al. 2020): unstructured masks, per-layer budgets, drop lowest |w|, grow highest
    |dense gradient| (grown weights start at 0). ``t_end``: optimizer steps after which the topology is
    fixed (required unless ``static=True``, a static random sparse network). ``grad_steps``: the dense
    gradient for growth is summed over the last ``grad_steps`` optimizer steps before each update (the
    research code's ``grad_accumulation_n``; 1 = only the update's own step, with all its micro-batches)."""
    return DynamicSparsity(
        model, optimizer, Unstructured(), LayerBudget(sparsity, distribution, erk_power_scale),
        _schedule(t_end, delta, alpha, static), dense_layers=dense_layers, include=include, exclude=exclude,
        ignore_linear=ignore_linear, ignore_grouped=ignore_grouped, sparse_init=sparse_init, init_gain=init_gain,
        seed=seed, grad_steps=grad_steps,
    )


def SRigL(  # noqa: N802
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsity: float | None = 0.9,
    t_end: int | None = None,
    *,
    ablation: float = 0.3,
    pattern: str | NM | None = None,
    no_ablation: Sequence[str] | str = (),
    distribution: str = "erk",
    delta: int = 100,
    alpha: float = 0.3,
    dense_layers: Sequence[str] | str = (),
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    ignore_linear: bool = False,
    ignore_grouped: bool = False,
    erk_power_scale: float = 1.0,
    static: bool = False,
    sparse_init: bool = True,
    init_gain: float = math.sqrt(2.0),
    seed: int = 0,
    grad_steps: int = 1,
) -> DynamicSparsity:
    """SRigL (Lasby et al. 2024): exactly ``k`` weights per active neuron; neurons with fewer than
    ``ablation * k`` salient weights are ablated and their budget shared by the rest. The last layer (the
    classifier) and ``no_ablation`` modules are never ablated. ``pattern="N:M"`` is the N:M variant:
    prune and regrow inside each group of M (always valid N:M, no ablation; ``sparsity`` is then 1 - N/M)."""
    if pattern is not None:
        nm = parse_pattern(pattern)
        if not isinstance(nm, NM):
            raise SemisparseError(f'pattern must be "N:M" (e.g. "2:4") for SRigL, got {pattern!r}')
        if sparsity is not None and abs(float(sparsity) - (1 - nm.density)) > 1e-6 and sparsity != 0.9:
            warnings.warn(f"SRigL with pattern {nm}: sparsity is {1 - nm.density:g}; sparsity={sparsity} ignored",
                          stacklevel=2)
        rule, budget = NMGroups(nm), None  # every layer keeps N of M: no budget to share out
    else:
        rule = ConstantFanIn(ablation, as_globs(no_ablation, "no_ablation"))
        budget = LayerBudget(sparsity, distribution, erk_power_scale)
    return DynamicSparsity(
        model, optimizer, rule, budget, _schedule(t_end, delta, alpha, static), dense_layers=dense_layers,
        include=include, exclude=exclude, ignore_linear=ignore_linear, ignore_grouped=ignore_grouped,
        sparse_init=sparse_init, init_gain=init_gain, seed=seed, grad_steps=grad_steps,
    )


def _schedule(t_end: int | None, delta: int, alpha: float, static: bool) -> UpdateSchedule:
    if t_end is None and static:
        t_end = 1
    if t_end is None:
        raise SemisparseError("t_end is required: the optimizer step after which the topology stays fixed "
                              "(e.g. int(0.75 * total_steps))")
    return UpdateSchedule(delta=delta, t_end=t_end, alpha=alpha, static=bool(static))


def SRSTE(  # noqa: N802
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pattern: str | NM = "2:4",
    decay: float = 2e-4,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    *,
    dense_layers: Sequence[str] | str = (),
    ignore_linear: bool = False,
    ignore_grouped: bool = False,
) -> _SRSTE:
    """SR-STE: N:M from scratch, magnitude mask recomputed every step, straight-through gradient with
    ``decay`` on the pruned weights."""
    return _SRSTE(model, optimizer, pattern, decay, include, exclude, dense_layers=dense_layers,
                  ignore_linear=ignore_linear, ignore_grouped=ignore_grouped)


def from_flags(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dst: str,
    total_steps: int,
    *,
    sparsity_level: float = 0.9,
    delta: int = 100,
    alpha: float = 0.3,
    t_end: float = 0.75,
    distribution: str = "erk",
    ablation: float = 0.3,
    dense_layers: Sequence[str] | str = (),
    pattern: str | None = None,
    decay: float = 2e-4,
    masking: str | None = None,
    ignore_linear: bool = False,
    ignore_grouped: bool = False,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    seed: int = 0,
) -> DynamicSparsity | _SRSTE:
    """The scheduler for ``semisparse train --dst ...``. ``t_end`` is a fraction of ``total_steps``
    (optimizer steps of the whole run); ``masking`` is the ``--sparsity`` flag, which must be none."""
    if dst not in DST_METHODS:
        raise SemisparseError(f"unknown --dst {dst!r}; expected one of {', '.join(DST_METHODS)}")
    if masking not in (None, "none"):
        raise SemisparseError(
            f"--dst {dst} trains its own masks and cannot be combined with --sparsity {masking}; "
            "use one or the other (for N:M with SRigL: --dst srigl --pattern 2:4)"
        )
    if isinstance(t_end, bool) or not isinstance(t_end, (int, float)) or not 0.0 < float(t_end) <= 1.0:
        raise SemisparseError(f"--t-end is a fraction of all optimizer steps in (0, 1], got {t_end!r}")
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise SemisparseError(f"total_steps must be a positive int, got {total_steps!r}")
    common = dict(include=include, exclude=exclude, ignore_linear=ignore_linear, ignore_grouped=ignore_grouped,
                  dense_layers=dense_layers)
    if dst == "sr-ste":
        return SRSTE(model, optimizer, pattern=pattern or "2:4", decay=decay, **common)
    steps = max(1, int(float(t_end) * total_steps))
    sched = dict(sparsity=sparsity_level, t_end=steps, delta=delta, alpha=alpha, distribution=distribution,
                 seed=seed, **common)
    if dst == "rigl":
        return RigL(model, optimizer, **sched)
    if dst == "static":
        return RigL(model, optimizer, static=True, **sched)
    return SRigL(model, optimizer, ablation=ablation, pattern=pattern, **sched)
