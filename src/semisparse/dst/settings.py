"""The settings of sparse training as one object, :class:`DSTSettings`: every default and check once.

Everyone who starts sparse training reads it: ``ss.RigL`` / ``ss.SRigL`` / ``ss.SRSTE`` (their keyword
arguments are its fields), :func:`~.api.from_flags` and ``semisparse train`` (:meth:`DSTSettings.from_flags`
maps the flags' spellings onto the fields, once), and :class:`~semisparse.train.TrainingSparsity`, which
holds one and writes :meth:`DSTSettings.to_dict` into the checkpoint.

Building it checks each value once, by building the value objects the method is composed of: the
:class:`~.budgets.LayerBudget` (``sparsity``, ``distribution``), the rule (``ablation``, ``pattern``), the
:class:`~.schedule.UpdateSchedule` (``delta``, ``alpha``, ``t_end``) and the :class:`~.selection.LayerSelection`.
:meth:`DSTSettings.build` only adds the model and the optimizer. A default is written where its value object is
defined and read from there; the fields below name them all.

One name, one unit: ``t_end`` is an optimizer step; ``t_end_fraction`` a share of the run's optimizer steps
(``semisparse train --t-end``), used when no ``t_end`` is given and the run's length is known.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SemisparseError
from ..patterns import NM
from . import checks
from .budgets import LayerBudget
from .dynamic import INIT_GAIN, DynamicSparsity
from .rules import ConstantFanIn, NMGroups, Rule, Unstructured
from .schedule import UpdateSchedule
from .selection import LayerSelection, as_globs
from .srste import DECAY, SRSTE, nm_pattern

DST_METHODS = ("rigl", "srigl", "sr-ste", "static")
#: The pattern of SR-STE when none is given.
SRSTE_PATTERN = "2:4"
#: ``semisparse train``'s flag for each field (its errors name the flag).
FLAGS = {"method": "--dst", "sparsity": "--sparsity-level", "delta": "--delta", "alpha": "--alpha",
         "t_end_fraction": "--t-end", "distribution": "--distribution", "ablation": "--ablation",
         "dense_layers": "--dense-layers", "pattern": "--pattern", "seed": "--seed"}


def refuse_masks(dst: str | None, masking: str | None) -> None:
    """``--dst`` with ``--sparsity sparse_2x4|gumbel_2x4``: DST draws its own masks, so one of them must go."""
    if dst and masking not in (None, "none"):
        raise SemisparseError(f"--dst builds its own masks and cannot be combined with --sparsity {masking}; use "
                              "one or the other (for N:M with SRigL: --dst srigl --pattern 2:4)")


@dataclass(frozen=True)
class DSTSettings:
    """How a model is trained sparse: the method, its budget, rule and schedule, and which layers.

    ``method``: rigl | srigl | sr-ste | static (fixed random masks). ``sparsity``: the target over the budgeted
    layers (not for ``pattern`` N:M, where it is ``1 - N/M``). ``t_end``: the optimizer step after which the
    topology stays fixed; ``t_end_fraction``: the same as a share of ``total_steps`` (:meth:`build`) when no
    ``t_end`` is given. ``pattern``: SRigL's N:M variant, SR-STE's pattern (2:4 if None). ``decay``: SR-STE's
    decay on pruned weights. ``static``: the masks never change (``method="static"`` is RigL's, static). The
    rest as in :func:`semisparse.dst.api.RigL`.
    """

    method: str = "rigl"
    sparsity: float | None = 0.9
    distribution: str = LayerBudget.distribution
    erk_power_scale: float = LayerBudget.erk_power_scale
    delta: int = UpdateSchedule.delta
    alpha: float = UpdateSchedule.alpha
    t_end: int | None = None
    t_end_fraction: float = 0.75
    ablation: float = ConstantFanIn.ablation
    no_ablation: Sequence[str] | str = ()
    pattern: str | NM | None = None
    decay: float = DECAY
    static: bool = False
    layers: LayerSelection = field(default_factory=LayerSelection)
    sparse_init: bool = True
    init_gain: float = INIT_GAIN
    seed: int = 0
    grad_steps: int = 1
    # built from the fields above, once, by __post_init__ (None for SR-STE, which has no budget or schedule)
    rule: Rule | None = field(init=False, repr=False, compare=False, default=None)
    budget: LayerBudget | None = field(init=False, repr=False, compare=False, default=None)
    schedule: UpdateSchedule | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        checks.choice("method", self.method, DST_METHODS)
        checks.number("t_end_fraction", self.t_end_fraction, 0.0, 1.0, open_lo=True, example="0.75")
        if not isinstance(self.layers, LayerSelection):
            raise SemisparseError(f"layers must be a LayerSelection, got {type(self.layers).__name__}")
        if self.method == "sr-ste":
            return  # SRSTE checks its pattern and decay when built: it has no budget, rule or schedule here
        rule, budget = self._rule_and_budget()
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "schedule", UpdateSchedule(self.delta, self.t_end, self.alpha,
                                                            static=self.static or self.method == "static"))

    def _rule_and_budget(self) -> tuple[Rule, LayerBudget | None]:
        if self.method == "srigl" and self.pattern is not None:
            nm = nm_pattern(self.pattern, "SRigL")
            if self.sparsity is not None and abs(float(self.sparsity) - (1 - nm.density)) > 1e-6 \
                    and self.sparsity != DSTSettings.sparsity:
                warnings.warn(f"SRigL with pattern {nm}: sparsity is {1 - nm.density:g}; sparsity={self.sparsity} "
                              "ignored", stacklevel=5)
            return NMGroups(nm), None  # every layer keeps N of M: no budget to share out
        budget = LayerBudget(self.sparsity, self.distribution, self.erk_power_scale)
        if self.method == "srigl":
            return ConstantFanIn(self.ablation, self.no_ablation), budget
        return Unstructured(), budget

    @classmethod
    def from_flags(cls, dst: str, *, sparsity_level: float | None = None, delta: int | None = None,
                   alpha: float | None = None, t_end: float | None = None, distribution: str | None = None,
                   ablation: float | None = None, pattern: str | None = None, seed: int | None = None,
                   decay: float | None = None, dense_layers: Sequence[str] | str | None = None,
                   include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
                   ignore_linear: bool = False, ignore_grouped: bool = False) -> DSTSettings:
        """The settings of ``semisparse train --dst DST ...``, the flags under their own names (``t_end``: the
        ``--t-end`` fraction; None: not given, the field's default). A bad value names its flag."""
        given = {"sparsity": sparsity_level, "delta": delta, "alpha": alpha, "t_end_fraction": t_end,
                 "distribution": distribution, "ablation": ablation, "pattern": pattern, "seed": seed,
                 "decay": decay}
        try:
            layers = LayerSelection(include, exclude, ignore_linear, ignore_grouped, dense_layers or ())
            return cls(dst, layers=layers, **{k: v for k, v in given.items() if v is not None})
        except checks.ArgumentError as exc:
            raise exc.named(FLAGS.get(exc.argument, exc.argument)) from None

    def build(self, model: nn.Module, optimizer: torch.optim.Optimizer,
              total_steps: int | None = None) -> DynamicSparsity | SRSTE:
        """The scheduler on ``model``: checks the model and optimizer, then masks the model. ``total_steps``
        (the run's optimizer steps) places ``t_end`` at ``t_end_fraction`` of them when no ``t_end`` is given."""
        if self.method == "sr-ste":
            return SRSTE(model, optimizer, self.pattern or SRSTE_PATTERN, self.decay, layers=self.layers)
        schedule = self.schedule
        if schedule.t_end is None and total_steps is not None:
            steps = checks.number("total_steps", total_steps, 1, integer=True)
            schedule = schedule.until(max(1, int(self.t_end_fraction * steps)))
        return DynamicSparsity(model, optimizer, self.rule, self.budget, schedule, layers=self.layers,
                               sparse_init=self.sparse_init, init_gain=self.init_gain, seed=self.seed,
                               grad_steps=self.grad_steps)

    def to_dict(self) -> dict:
        """The fields as plain values (what a checkpoint stores)."""
        return {
            "method": self.method, "sparsity": self.sparsity, "distribution": self.distribution,
            "erk_power_scale": self.erk_power_scale, "delta": self.delta, "alpha": self.alpha, "t_end": self.t_end,
            "t_end_fraction": self.t_end_fraction, "ablation": self.ablation,
            "no_ablation": list(as_globs(self.no_ablation, "no_ablation")), "pattern": None if self.pattern is None
            else str(self.pattern), "decay": self.decay, "static": self.static, "sparse_init": self.sparse_init,
            "init_gain": self.init_gain, "seed": self.seed, "grad_steps": self.grad_steps,
            "layers": self.layers.to_dict(),
        }  # fmt: skip
