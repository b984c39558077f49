"""Dynamic sparse training: layer budgets x update schedule x prune/grow rule.

* :mod:`.budgets` - uniform and ERK layer densities;
* :mod:`.schedule` - an update every ``delta`` steps until ``t_end``, cosine-decayed drop fraction;
* :mod:`.prune_grow` - RigL, SRigL (constant fan-in + neuron ablation) and N:M prune/grow, vectorised per layer;
* :mod:`.rules` - each method's rule as an object (initial mask, update, target): ``Unstructured``,
  ``ConstantFanIn``, ``NMGroups``;
* :mod:`.dynamic` - :class:`DynamicSparsity`, the stateful scheduler (``step``/``state_dict``);
* :mod:`.srste` - SR-STE, N:M from scratch with a straight-through gradient;
* :mod:`.selection` - :class:`LayerSelection` (which layers) and the opening checks every method shares;
* :mod:`.checks` - the one check of each argument (an :class:`~.checks.ArgumentError` names it);
* :mod:`.settings` - :class:`DSTSettings`, every default and check of a sparse-training run in one object;
* :mod:`.api` - the factories ``RigL``, ``SRigL``, ``SRSTE`` and ``from_flags`` for the CLI.
"""

from .api import DST_METHODS, SRSTE, RigL, SRigL, from_flags
from .budgets import LayerBudget, erk_densities, layer_densities, uniform_densities
from .dynamic import DynamicSparsity
from .rules import ConstantFanIn, NMGroups, Rule, Unstructured
from .schedule import UpdateSchedule
from .selection import LayerSelection
from .settings import DSTSettings
from .srste import STEMask

__all__ = [
    "DST_METHODS",
    "RigL",
    "SRigL",
    "SRSTE",
    "from_flags",
    "DynamicSparsity",
    "DSTSettings",
    "LayerSelection",
    "UpdateSchedule",
    "LayerBudget",
    "Rule",
    "Unstructured",
    "ConstantFanIn",
    "NMGroups",
    "STEMask",
    "erk_densities",
    "layer_densities",
    "uniform_densities",
]
