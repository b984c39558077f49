"""Short factories: each method is a combination of budget x schedule x rule (see :class:`DynamicSparsity`).

RigL = ``LayerBudget`` x ``UpdateSchedule`` x :class:`~.rules.Unstructured`; SRigL the same with
:class:`~.rules.ConstantFanIn` (or :class:`~.rules.NMGroups` for ``pattern="N:M"``).

``ss.RigL`` / ``ss.SRigL`` / ``ss.SRSTE`` are the public names: each gathers its keyword arguments into a
:class:`~.settings.DSTSettings` (where every default and check lives) and builds it. :func:`from_flags` does
the same for the ``semisparse train`` flags (``--dst --sparsity-level --delta --alpha --t-end FRACTION ...``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..patterns import NM
from .dynamic import DynamicSparsity
from .selection import LayerSelection
from .settings import DST_METHODS, SRSTE_PATTERN, DSTSettings, refuse_masks
from .srste import SRSTE as _SRSTE

__all__ = ["DST_METHODS", "RigL", "SRigL", "SRSTE", "from_flags"]

_D = DSTSettings  # the defaults below are its fields'


def RigL(  # noqa: N802 - public name of the method
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsity: float = _D.sparsity,
    t_end: int | None = None,
    *,
    distribution: str = _D.distribution,
    delta: int = _D.delta,
    alpha: float = _D.alpha,
    dense_layers: Sequence[str] | str = (),
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    ignore_linear: bool = False,
    ignore_grouped: bool = False,
    erk_power_scale: float = _D.erk_power_scale,
    static: bool = False,
    sparse_init: bool = _D.sparse_init,
    init_gain: float = _D.init_gain,
    seed: int = _D.seed,
    grad_steps: int = _D.grad_steps,
) -> DynamicSparsity:
    """RigL (Evci et al. 2020): unstructured masks, per-layer budgets, drop lowest |w|, grow highest
    |dense gradient| (grown weights start at 0). ``t_end``: optimizer steps after which the topology is
    fixed (required unless ``static=True``, a static random sparse network). ``grad_steps``: the dense
    gradient for growth is summed over the last ``grad_steps`` optimizer steps before each update (the
    research code's ``grad_accumulation_n``; 1 = only the update's own step, with all its micro-batches)."""
    layers = LayerSelection(include, exclude, ignore_linear, ignore_grouped, dense_layers)
    return DSTSettings(
        "rigl", sparsity, distribution, erk_power_scale, delta, alpha, t_end, static=static, layers=layers,
        sparse_init=sparse_init, init_gain=init_gain, seed=seed, grad_steps=grad_steps,
    ).build(model, optimizer)


def SRigL(  # noqa: N802
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsity: float | None = _D.sparsity,
    t_end: int | None = None,
    *,
    ablation: float = _D.ablation,
    pattern: str | NM | None = None,
    no_ablation: Sequence[str] | str = (),
    distribution: str = _D.distribution,
    delta: int = _D.delta,
    alpha: float = _D.alpha,
    dense_layers: Sequence[str] | str = (),
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    ignore_linear: bool = False,
    ignore_grouped: bool = False,
    erk_power_scale: float = _D.erk_power_scale,
    static: bool = False,
    sparse_init: bool = _D.sparse_init,
    init_gain: float = _D.init_gain,
    seed: int = _D.seed,
    grad_steps: int = _D.grad_steps,
) -> DynamicSparsity:
    """SRigL (Lasby et al. 2024): exactly ``k`` weights per active neuron; neurons with fewer than
    ``ablation * k`` salient weights are ablated and their budget shared by the rest. The last layer (the
    classifier) and ``no_ablation`` modules are never ablated. ``pattern="N:M"`` is the N:M variant:
    prune and regrow inside each group of M (always valid N:M, no ablation; ``sparsity`` is then 1 - N/M)."""
    layers = LayerSelection(include, exclude, ignore_linear, ignore_grouped, dense_layers)
    return DSTSettings(
        "srigl", sparsity, distribution, erk_power_scale, delta, alpha, t_end, ablation=ablation,
        no_ablation=no_ablation, pattern=pattern, static=static, layers=layers, sparse_init=sparse_init,
        init_gain=init_gain, seed=seed, grad_steps=grad_steps,
    ).build(model, optimizer)


def SRSTE(  # noqa: N802
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pattern: str | NM = SRSTE_PATTERN,
    decay: float = _D.decay,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    *,
    dense_layers: Sequence[str] | str = (),
    ignore_linear: bool = False,
    ignore_grouped: bool = False,
) -> _SRSTE:
    """SR-STE: N:M from scratch, magnitude mask recomputed every step, straight-through gradient with
    ``decay`` on the pruned weights."""
    layers = LayerSelection(include, exclude, ignore_linear, ignore_grouped, dense_layers)
    return DSTSettings("sr-ste", pattern=pattern, decay=decay, layers=layers).build(model, optimizer)


def from_flags(model: nn.Module, optimizer: torch.optim.Optimizer, dst: str, total_steps: int, *,
               masking: str | None = None, **flags: object) -> DynamicSparsity | _SRSTE:
    """The scheduler for ``semisparse train --dst ...``: ``flags`` are the flags' values under their own
    names (:meth:`DSTSettings.from_flags`: ``sparsity_level``, ``t_end`` a fraction of ``total_steps``, ...);
    ``masking`` is the ``--sparsity`` flag, which must be none."""
    refuse_masks(dst, masking)
    return DSTSettings.from_flags(dst, **flags).build(model, optimizer, total_steps)
