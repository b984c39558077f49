"""The one place where sparsity meets training.

``TrainingSparsity(SparsityConfig(...))`` is called at three points of a run and nowhere else:

1. ``apply(model, total_steps)`` - before the optimizer exists, after ``--weights`` are loaded: fixed
   magnitude masks (``ss.sparsify(model, pattern, "magnitude")``, the ASP recipe: prune once, retrain) or
   learned Gumbel masks (``method="gumbel"``).
2. ``attach(model, optimizer, total_steps)`` - after the optimizer exists: dynamic sparse training
   (``ss.RigL``, ``ss.SRigL``, ``ss.SRSTE``, built by :func:`semisparse.dst.api.from_flags`, the one
   mapping of the ``--dst`` flags), which needs the optimizer to mask its state.
3. ``after_optimizer_step(step)`` - after every ``optimizer.step()``: the Gumbel temperature schedule
   (``semisparse.masking.gumbel.set_step``) or the DST update (``.step()``); ``after_skipped_step()`` when
   the GradScaler skipped the optimizer step (fp16 overflow), which the schedules do not count.

``state_dict()``/``load_state_dict()`` carry what is not in the model's own state_dict (the step, the
DST schedule). Masks themselves live in the model's state_dict as parametrization buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..dst.rules import ConstantFanIn
from ..dst.selection import LayerSelection
from ..dst.settings import SRSTE_PATTERN, DSTSettings, refuse_masks
from ..errors import SemisparseError
from ..masking import masks as model_masks
from ..masking import sparse_weights, sparsify
from ..masking.coverage import Report
from ..masking.coverage import report as ss_report

METHODS = ("none", "magnitude", "gumbel", "given")
#: Training batches a calibrated ``prior_from`` prunes on.
CALIB_BATCHES = 16


@dataclass
class SparsityConfig:
    """How a run is made sparse. ``method``: none | magnitude | gumbel | given (the masks the model already
    carries, from ``--weights``, kept fixed); ``layers``: which layers the masks take; ``dst``: dynamic
    sparse training, a :class:`~semisparse.dst.DSTSettings` (its own layers) or None."""

    method: str = "none"
    pattern: str | None = "2:4"
    trainable: str = "all"  # gumbel only: "mask" (weights frozen) | "all"
    tau: tuple[float, float] | None = None
    prior: float | None = None
    prior_from: str | None = None  # gumbel: "magnitude" | "wanda" | "sparsegpt" (the masks' starting argmax)
    shared_rows: int | None = None  # gumbel: consecutive output rows that learn one mask (None: the library's 1)
    permute: bool = False
    pad: bool = False
    layers: LayerSelection = field(default_factory=LayerSelection)
    dst: DSTSettings | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SemisparseError(f"unknown sparsity method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.dst is not None and not isinstance(self.dst, DSTSettings):
            raise SemisparseError(f"dst must be DSTSettings or None, got {type(self.dst).__name__}")
        refuse_masks(self.dst and self.dst.method, {"magnitude": "sparse_2x4", "gumbel": "gumbel_2x4"}.get(self.method))
        if self.prior_from is not None and self.method != "gumbel":
            raise SemisparseError("--mask-prior-from sets where learned masks start: it needs --sparsity gumbel_2x4")
        if self.shared_rows is not None and self.method != "gumbel":
            raise SemisparseError("--mask-shared-rows shares learned masks by blocks of rows: it needs --sparsity "
                                  "gumbel_2x4")
        if self.trainable not in ("mask", "all"):
            raise SemisparseError(f"trainable must be 'mask' or 'all', got {self.trainable!r}")

    @property
    def enabled(self) -> bool:
        return self.method != "none" or self.dst is not None

    @property
    def name(self) -> str:
        return self.dst.method if self.dst is not None else self.method

    def to_dict(self) -> dict:
        """Plain values (what a checkpoint stores), the DST settings under ``dst``."""
        return {"method": self.method, "pattern": self.pattern, "trainable": self.trainable,
                "tau": None if self.tau is None else list(self.tau), "prior": self.prior,
                "prior_from": self.prior_from, "shared_rows": self.shared_rows, "permute": self.permute,
                "pad": self.pad,
                "layers": self.layers.to_dict(),
                "dst": None if self.dst is None else self.dst.to_dict()}  # fmt: skip


def _images(batch: object) -> object:
    """The input of an ``(images, labels)`` training batch (any loader, not only a DataLoader)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class TrainingSparsity:
    """Applies a :class:`SparsityConfig` to a model and keeps it up to date during training (module doc)."""

    def __init__(self, config: SparsityConfig | None = None) -> None:
        self.config = config or SparsityConfig()
        self.step = 0
        self.dst: object | None = None
        self._model: nn.Module | None = None
        self._updates = 0  # topology updates since the last epoch_stats()

    # -- set-up ----------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, total_steps: int, example_input: torch.Tensor | None = None,
              calibration: object = None) -> Report | None:  # fmt: skip
        """Mask ``model`` (magnitude or gumbel); returns the coverage report, None when nothing to do.

        ``calibration`` (batches or a loader) is what a calibrated ``prior_from`` prunes on."""
        c = self.config
        self._model = model
        if c.method == "none":
            return None
        if c.method == "given":
            if not any(True for _ in sparse_weights(model)):
                raise SemisparseError("sparsity method 'given' keeps the model's masks, but it carries none")
            return ss_report(model, example_input=example_input)
        lay = c.layers
        common = dict(include=lay.include, exclude=lay.exclude, example_input=example_input, pad=c.pad,
                      ignore_linear=lay.ignore_linear, ignore_grouped=lay.ignore_grouped)  # fmt: skip
        if c.permute:
            common["permute"] = True
        if c.method == "magnitude":
            return sparsify(model, c.pattern, "magnitude", **common)
        opts: dict[str, object] = {"trainable": c.trainable, "total_steps": int(total_steps)}
        if c.tau is not None:
            opts["tau"] = tuple(c.tau)
        if c.prior is not None:
            opts["prior"] = c.prior
        if c.shared_rows is not None:
            opts["shared_rows"] = c.shared_rows
        if c.prior_from is not None:
            opts["prior_from"] = c.prior_from
            if c.prior_from != "magnitude":
                common.update(calibration=calibration, calib_batches=CALIB_BATCHES, collect=_images)
        return sparsify(model, c.pattern, "gumbel", **common, **opts)

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """Start dynamic sparse training on ``model`` (``--dst``); a no-op otherwise."""
        self._model = model
        if self.config.dst is not None:
            self.dst = self.config.dst.build(model, optimizer, int(total_steps))

    # -- during training -------------------------------------------------------------------------------
    def after_optimizer_step(self, step: int) -> None:
        """Call after every ``optimizer.step()``; ``step`` counts optimizer steps from 1."""
        self.step = int(step)
        if self.config.method == "gumbel" and self._model is not None:
            from ..masking.gumbel import set_step

            set_step(self._model, self.step)
        if self.dst is not None and self.dst.step() and getattr(self.dst, "schedule", None) is not None:
            self._updates += 1  # SR-STE (no schedule) recomputes its masks every step: not counted

    def after_skipped_step(self) -> None:
        """Call when the optimizer skipped its step (fp16: the GradScaler found inf/NaN gradients): it is no
        step of the schedule. Learned masks go back to the last optimizer step's position (their backward
        advanced it); DST drops the gradients it captured in that backward and does not count the step."""
        if self.config.method == "gumbel" and self._model is not None:
            from ..masking.gumbel import set_step

            set_step(self._model, self.step)
        if self.dst is not None:
            self.dst.step(stepped=False)

    def schedule_line(self) -> str | None:
        """One line saying when DST updates the topology (as learned masks print their temperature schedule)."""
        sched = getattr(self.dst, "schedule", None)
        name = self.config.name
        if sched is None:
            return None if self.dst is None else f"{name}: masks recomputed from magnitudes every step"
        if sched.static:
            return f"{name}: masks fixed (no topology update)"
        updates = max(0, (sched.t_end - 1) // sched.delta)
        rule = self.config.dst.rule
        ablation = f", ablation {rule.ablation:g}" if isinstance(rule, ConstantFanIn) and rule.ablation else ""
        return (f"{name}: topology update every {sched.delta} steps before step {sched.t_end} "
                f"({updates} updates), drop fraction {sched.alpha:g} -> 0 (cosine){ablation}")

    def scheduled_updates(self) -> int | None:
        """How many topology updates the whole run will make (None when DST has no update schedule)."""
        sched = getattr(self.dst, "schedule", None)
        if sched is None or sched.static:
            return None if sched is None else 0
        return max(0, (sched.t_end - 1) // sched.delta)

    def epoch_stats(self) -> dict:
        """What ``metrics.jsonl`` records of DST for the epoch just ended: topology updates made in it and
        neurons ablated (no input left) across the sparse layers; empty without DST."""
        if self.dst is None or not hasattr(self.dst, "layer_stats"):
            return {}
        stats = {"dst_updates": self._updates,
                 "dst_ablated_neurons": sum(s["neurons"] - s["alive"] for s in self.dst.layer_stats())}  # fmt: skip
        self._updates = 0
        return stats

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"step": self.step, "config": self.config.to_dict()}
        if self.dst is not None and hasattr(self.dst, "state_dict"):
            state["dst"] = self.dst.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
        if self.dst is not None and state.get("dst") is not None:
            self.dst.load_state_dict(state["dst"])
        if self.config.method == "gumbel" and self._model is not None and self.step:
            from ..masking.gumbel import set_step

            set_step(self._model, self.step)

    def checkpoint_entry(self, model: nn.Module) -> dict:
        """The checkpoint's ``sparsity`` entry: masks by weight name, pattern, method and state."""
        c, d = self.config, self.config.dst
        pattern = c.pattern if c.method != "none" else None
        if d is not None and d.method == "sr-ste":
            pattern = str(d.pattern or SRSTE_PATTERN)
        elif d is not None:
            pattern = f"{d.sparsity:g}" if d.budget is not None else str(d.pattern)  # N:M SRigL has no budget
        return {"masks": model_masks(model), "pattern": pattern, "method": c.name,
                "state": self.state_dict() if c.enabled else None}  # fmt: skip


@torch.no_grad()
def zero_share(model: nn.Module) -> float:
    """Share of zeros among the sparsified layers' effective (deterministic-mask) weights; 0.0 if none."""
    zeros = total = 0
    for sw in sparse_weights(model):
        w = sw.original * sw.parametrization.hard_mask().to(sw.original.dtype)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0
