"""Which layers a sparsity method takes, checked once for every method that sets its own masks.

Dynamic sparse training and SR-STE open the same way: the plain model (not DDP), no masks on it yet,
the eligible layers for the pattern, the layers forced dense by ``dense_layers`` and an optimizer that
holds every eligible weight. :class:`LayerSelection` holds the five options that pick the layers;
:func:`select_layers` does all of it before anything is changed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SemisparseError
from ..layout import Candidate, plan
from ..masking.parametrization import sparse_weights
from ..patterns import NM


@dataclass(frozen=True)
class Selection:
    """The layers a method takes: ``eligible`` for the pattern, of which ``dense`` are kept dense."""

    model: nn.Module
    candidates: list[Candidate]
    eligible: list[Candidate]
    dense: list[Candidate]

    @property
    def budgeted(self) -> list[Candidate]:
        """The eligible layers that are made sparse."""
        return [c for c in self.eligible if c not in self.dense]


def refuse_ddp(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel``, else ``model``; a ``DistributedDataParallel`` model is an error.

    DDP hooks the gradient accumulators of the parameters when it is built, and registering a
    parametrization afterwards replaces them, so DDP would never see the weights' gradients. Build the
    scheduler on the plain model (after the optimizer, before ``DistributedDataParallel(model)``).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise SemisparseError(
            "build the sparsity scheduler on the plain model before wrapping it in DistributedDataParallel "
            "(order: model, optimizer, scheduler, then DistributedDataParallel(model))"
        )
    while isinstance(model, nn.DataParallel):
        model = model.module
    return model


def check_optimizer(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], keys: Sequence[str]) -> None:
    """Raise if ``optimizer`` does not hold every parameter in ``params`` (named by ``keys``)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SemisparseError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [k for p, k in zip(params, keys) if id(p) not in held]
    if missing:
        raise SemisparseError(
            f"the optimizer does not hold the model's weight(s) {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}; build it from this model's parameters "
            "(e.g. torch.optim.SGD(model.parameters(), ...)) before the sparsity scheduler"
        )


def matches(c: Candidate, globs: Sequence[str]) -> bool:
    """Whether a candidate layer's module name or weight key matches one of ``globs``."""
    return any(fnmatch.fnmatchcase(c.name, g) or fnmatch.fnmatchcase(c.key, g) for g in globs)


def as_globs(value: Sequence[str] | str | None, what: str) -> tuple[str, ...]:
    """Module-name globs given as one string or a sequence of them (``what`` names the argument in errors)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(v, str) for v in value):
        raise SemisparseError(f"{what} must be module names or globs (strings), got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class LayerSelection:
    """Which layers a sparsity method takes: the five options every method shares, checked here once.

    ``include`` / ``exclude``: module-name globs (None: every layer); ``ignore_linear`` / ``ignore_grouped``:
    keep Linear layers / grouped convolutions dense; ``dense_layers``: globs of eligible layers kept dense,
    ``"first"`` for the first eligible layer. Globs may be given as one string or a sequence of them.
    """

    include: Sequence[str] | str | None = None
    exclude: Sequence[str] | str | None = None
    ignore_linear: bool = False
    ignore_grouped: bool = False
    dense_layers: Sequence[str] | str = ()

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else as_globs(value, name))
        object.__setattr__(self, "dense_layers", as_globs(self.dense_layers, "dense_layers"))

    def to_dict(self) -> dict:
        """Plain values (what a checkpoint stores)."""
        return {"include": None if self.include is None else list(self.include),
                "exclude": None if self.exclude is None else list(self.exclude),
                "ignore_linear": self.ignore_linear, "ignore_grouped": self.ignore_grouped,
                "dense_layers": list(self.dense_layers)}  # fmt: skip

    def plan(self, model: nn.Module, pattern: NM | None) -> list[Candidate]:
        """The model's candidate layers for ``pattern`` under these options (:func:`semisparse.layout.plan`)."""
        return plan(model, pattern, self.include, self.exclude, ignore_linear=self.ignore_linear,
                    ignore_grouped=self.ignore_grouped)


def select_layers(model: nn.Module, optimizer: torch.optim.Optimizer, pattern: NM | None, what: str,
                  layers: LayerSelection | None = None) -> Selection:
    """Check ``model`` and ``optimizer`` for a method (``what``) that sets its own masks; change nothing."""
    layers = layers or LayerSelection()
    dense_globs = layers.dense_layers
    inner = refuse_ddp(model)
    existing = list(sparse_weights(inner))
    if existing:
        raise SemisparseError(
            f"model is already sparsified ({len(existing)} masked weights, e.g. {existing[0].key}); "
            f"{what} sets its own masks: start from a dense model or call ss.finalize first"
        )
    candidates = layers.plan(inner, pattern)
    eligible = [c for c in candidates if c.eligible]
    if not eligible:
        reasons = sorted({c.reason for c in candidates if c.reason}) or [
            "it has no Linear, Conv or MultiheadAttention layer"]
        what_pattern = f"made {pattern}" if pattern is not None else "made sparse"
        raise SemisparseError(f"no layer of this model can be {what_pattern}: {'; '.join(reasons)}")
    check_optimizer(optimizer, [getattr(c.module, c.param) for c in eligible], [c.key for c in eligible])
    first = eligible[0]
    dense = [c for c in eligible if matches(c, dense_globs) or ("first" in dense_globs and c is first)]
    unknown = [g for g in dense_globs if g != "first" and not any(matches(c, [g]) for c in candidates)]
    if unknown:
        raise SemisparseError(f"dense_layers {', '.join(unknown)} match no Linear/Conv layer of the model")
    if len(dense) == len(eligible):
        raise SemisparseError("every eligible layer is in dense_layers: nothing left to make sparse")
    return Selection(inner, candidates, eligible, dense)
