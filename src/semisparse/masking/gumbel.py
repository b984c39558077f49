"""Learned N:M masks: a Gumbel-softmax over the C(M, N) keep-patterns of every group (MaskLLM-style).

Every group of M weights along the reduction axis (the layout's ``(rows, K)`` view, groups of M along K)
owns C(M, N) logits, one per pattern of the constant pattern table (a non-trainable buffer, ``(P, M)``;
the masking seed made it a parameter and every "mask" went dense). The logits are compact,
``(C(M, N), rows, K // M)`` (pattern planes; a row's K // M groups ordered (channel group, kernel tap)),
and live in the state_dict next to the dense weight, with the schedule position::

    conv1.parametrizations.weight.original    # dense weight (frozen with trainable="mask")
    conv1.parametrizations.weight.0.logits    # (C(M, N), rows, K // M), trained
    conv1.parametrizations.weight.0.step      # schedule position (int64 scalar buffer)

With ``shared_rows=s`` the logits are ``(C(M, N), ceil(rows / s), K // M)``: one row of logits per block of s
rows, whose sampled pattern every row of the block takes.

In training mode (with grad enabled) a pattern is sampled per group: hard straight-through samples of
``softmax((scale * logits + g) / tau)``, ``g`` Gumbel noise; in eval mode (or without grad) the mask is
the deterministic argmax pattern, and that is what ``ss.masks``, ``ss.check``, ``ss.report`` and
``ss.finalize`` see.

**Annealing.** ``tau`` goes linearly from ``tau[0]`` to ``tau[1]`` (and ``scale`` from its start to its
end, when given a pair) over ``total_steps``. The position counts backward passes through sampled masks
(each ``loss.backward()`` advances it by 1; merely reading ``module.weight`` does not), so the plain
``loss.backward(); opt.step()`` loop anneals without any extra call; a training engine that accumulates
gradients calls :func:`set_step` with the optimizer step after each ``opt.step()`` to pin it. The position
is saved, so a resumed run continues the same annealing.

**Options** of ``ss.sparsify(model, "2:4", method="gumbel", **options)``:
``trainable`` "mask" (default: only the logits train; dense weights, and everything else, frozen) | "all";
``total_steps`` (required, > 0); ``tau=(start, end)`` (4, 0.05), never rising; ``scale`` a number or
``(start, end)`` multiplying the logits (2 -> 20: late samples approach the argmax, as MaskLLM's kappa);
``prior`` prior strength (3; 0 = uniform); ``shared_rows`` (1) one set of logits per block of that many
consecutive rows of the view, so every sampled and final mask is the same in each row of a block (4: the CPU
deploy's rows4 kernels; every row is still N:M); ``prior_from`` "magnitude" (default) | "wanda" | "sparsegpt" (the
argmax starts as that one-shot mask; needs ``calibration=``); ``hard`` straight-through 0/1 samples (True) or soft
masks; ``regularizer`` None | "entropy" | "magnitude" | (name, weight), applied through the logits'
gradient (no extra loss term to add); ``train_bias`` (False); ``bn`` "recalibrate" | "freeze" | "train"
(see :func:`apply_trainable`).

Speed: a training step samples and differentiates each hard mask in a fixed handful of whole-tensor ops
(:mod:`semisparse.masking.sampling`), one fused Triton kernel each way on CUDA
(:mod:`semisparse.masking.sampling_triton`) or numba's fused kernels on CPU when installed; the schedule
position is never read back from the device in a step (see :class:`GumbelMask`), and the forward traces
into ``torch.compile`` without graph breaks. :func:`set_backend` picks the implementation.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import SemisparseError
from ..layout import Candidate, Layout
from ..patterns import MAX_PATTERNS, NM, FanIn, pattern_table, shared_row_scores
from . import sampling_triton
from .parametrization import SparseParametrization, sparse_weights
from .sampling import (
    HAVE_NUMBA,
    Geometry,
    LeanHardSample,
    NumbaHardSample,
    PlaneSample,
    RegularizerGrad,
    first_argmax0,
    from_slots,
    gather_mask,
    kept_slots,
    patterns_to_slots,
    schedule_tensors,
    slot_weighted,
    to_slots,
)

TRAINABLE = ("mask", "all")
BN_MODES = ("recalibrate", "freeze", "train")
REGULARIZERS = ("entropy", "magnitude")
DEFAULTS: dict[str, object] = {
    "trainable": "mask",
    "total_steps": None,
    "tau": (4.0, 0.05),
    "prior": 3.0,
    "hard": True,
    "scale": (2.0, 20.0),
    "regularizer": None,
    "train_bias": False,
    "bn": "recalibrate",
    "shared_rows": 1,
}
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


#: Where numba is installed, hard samples on CPU fp32 use its fused kernels (tests switch this off to check
#: the torch path; ``set_backend("torch")`` does the same for every device).
USE_NUMBA = HAVE_NUMBA

#: How a training forward samples a hard mask on a "rows"/"conv" layout (soft masks and padded layouts
#: always use the pattern planes of :class:`~semisparse.masking.sampling.PlaneSample`):
#: "auto" - Triton's fused kernels on CUDA when Triton is installed, numba's on CPU fp32 when installed
#: (``USE_NUMBA``), the lean torch ops otherwise; "torch" - :class:`~semisparse.masking.sampling.LeanHardSample`
#: everywhere; "triton" - the fused kernels (an error where they cannot run); "compiled" - the lean torch ops
#: through ``torch.compile`` (one dynamic-shape graph for all layers); "numba" - numba's kernels on CPU fp32
#: (the lean torch ops elsewhere).
#: Inside a ``torch.compile``d model the lean torch ops are always traced.
BACKENDS = ("auto", "torch", "triton", "compiled", "numba")
_BACKEND = {"name": os.environ.get("SEMISPARSE_MASK_BACKEND", "auto")}


def set_backend(name: str) -> None:
    """Choose how learned masks are sampled in training (see ``BACKENDS``); for benchmarks and tests."""
    if name not in BACKENDS:
        raise SemisparseError(f"unknown mask sampling backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "triton" and not sampling_triton.available():
        raise SemisparseError(f"backend 'triton' needs the triton package ({sampling_triton.why_unavailable()})")
    if name == "numba" and not HAVE_NUMBA:
        raise SemisparseError("backend 'numba' needs numba (pip install semisparse[fast])")
    _BACKEND["name"] = name


def get_backend() -> str:
    """The sampling backend set by :func:`set_backend` (or ``SEMISPARSE_MASK_BACKEND``), default "auto"."""
    return _BACKEND["name"]


def _compiled_lean():
    """The lean torch sample through ``torch.compile``, built once with dynamic shapes (one graph for every
    layer); the schedule is computed on the device from the ``step`` buffer inside the graph."""
    fn = _COMPILED.get("fn")
    if fn is None:

        def lean(weight, logits, step, table_batched, table, out, cg, taps, tau, scale, total_steps):
            sched = schedule_tensors(step, tau, scale, total_steps, logits.dtype)
            return LeanHardSample.apply(weight, logits, step, table_batched, table, out, cg, taps, *sched, None)

        fn = _COMPILED["fn"] = torch.compile(lean, dynamic=True, backend=_COMPILED["backend"])
    return fn


#: The compiled function, built on first use; "backend" is torch.compile's (benchmarks' CPU smoke runs use
#: "aot_eager": the same traced graphs without inductor's C++ build).
_COMPILED: dict[str, object] = {"backend": "inductor"}


class GumbelMask(SparseParametrization):
    """``weight = original * mask(logits)``; logits ``(C(M, N), rows, G)`` over the pattern table.

    Logits are stored as pattern planes (``logits[p]`` scores pattern ``p`` for every group; ``rows`` and
    ``G`` as in :func:`~semisparse.masking.sampling.to_slots`). ``allowed`` (padded kernel-tap layouts only)
    is a ``(P, 1, G)`` bool table of the patterns that never keep a padding slot in preference to a real
    weight; the same for every row.

    ``shared_rows > 1``: the logits' rows are blocks of that many consecutive rows of the view; each block's
    pattern (sampled or argmax) is broadcast to its rows, so the gradient of a block's logits sums its rows'.

    The schedule position lives in the ``step`` buffer (saved) and, for the eager forward, in a host-side
    copy ``_host_step`` kept equal to it by every writer here (backward, :func:`set_step`, loading a
    state_dict; None = read the buffer once): reading the buffer itself would synchronise a GPU per layer.
    """

    def __init__(
        self,
        layout: Layout,
        nm: NM,
        logits: torch.Tensor,
        *,
        total_steps: int,
        tau: tuple[float, float],
        scale: tuple[float, float],
        hard: bool = True,
        regularizer: tuple[str, float] | None = None,
        allowed: torch.Tensor | None = None,
        original_requires_grad: bool | None = None,
        shared_rows: int = 1,
    ) -> None:
        super().__init__(layout, nm)
        self.shared_rows = int(shared_rows)
        blocks = -(-_view_rows(layout) // self.shared_rows)
        if logits.shape[1] != blocks:
            raise SemisparseError(f"logits have {logits.shape[1]} rows; expected {blocks} (rows of the view in blocks "
                                  f"of shared_rows={self.shared_rows})")  # fmt: skip
        # the shape the sampled block masks take ("rows"/"conv" layouts): the weight's, with one row per block
        self.block_shape = (blocks, *layout.shape[1:])
        table = pattern_table(nm.n, nm.m)
        npat = table.shape[0]
        self.register_buffer("table", table.to(logits.device, logits.dtype), persistent=False)
        self.logits = nn.Parameter(logits)
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=logits.device))
        self.register_buffer("allowed", allowed, persistent=False)
        kept = table.nonzero()[:, 1].reshape(npat, nm.n)  # (P, N) kept slots
        self.register_buffer("kept", kept.to(logits.device), persistent=False)
        # table_t[j * P + p] = table[p, j]: one take() gathers sampled patterns in the weight's layout
        self.register_buffer("table_t", self.table.t().reshape(-1).clone(), persistent=False)
        offsets = (torch.arange(nm.m, device=logits.device) * npat).reshape(nm.m, 1)
        self.register_buffer("slot_offsets", offsets, persistent=False)
        self.kept_slots = kept_slots(table)
        self.geometry = Geometry.of(Layout(layout.mode, self.block_shape), nm.m) if layout.mode != "taps" else None
        self.total_steps = int(total_steps)
        self.tau = (float(tau[0]), float(tau[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.hard = bool(hard)
        self.regularizer = regularizer
        self.original_requires_grad = original_requires_grad
        self._host_step: int | None = 0
        self._sched: tuple | None = None  # see _host_schedule
        self._batched: tuple | None = None  # see _table_batched

    def extra_repr(self) -> str:
        return (
            f"{self.target}, logits={tuple(self.logits.shape)}, tau={self.tau}, scale={self.scale}, "
            f"total_steps={self.total_steps}, hard={self.hard}"
            + (f", shared_rows={self.shared_rows}" if self.shared_rows > 1 else "")
        )

    def schedule(self, step: int | None = None) -> tuple[float, float]:
        """``(tau, scale)`` at ``step`` (default: the current position), linear, constant after the end."""
        s = self._position() if step is None else step
        f = min(max(s, 0), self.total_steps) / self.total_steps
        return (
            self.tau[0] + f * (self.tau[1] - self.tau[0]),
            self.scale[0] + f * (self.scale[1] - self.scale[0]),
        )

    def _position(self) -> int:
        if self._host_step is None:
            self._host_step = int(self.step)
        return self._host_step

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_sched": None, "_batched": None}  # caches: a copy (deepcopy, pickle) builds its own

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_step = None  # the loaded position is read once, at the next training forward

    def _masked_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.allowed is None:
            return logits
        return logits.masked_fill(~self.allowed, float("-inf"))

    def pattern_index(self) -> torch.Tensor:
        """The argmax pattern of every group, ``(rows, G)`` int64 (ties: the lower index); with ``shared_rows``
        one row per block, ``(ceil(rows / shared_rows), G)``."""
        return first_argmax0(self._masked_logits(self.logits.detach()))

    def hard_mask(self) -> torch.Tensor:
        idx = self.pattern_index()
        if self.geometry is not None:
            block = gather_mask(idx, self.table_t, self.slot_offsets, self.geometry).view(self.block_shape).bool()
            return self._to_rows(block, 0)
        planes = patterns_to_slots(idx, self.kept_slots, self.target.m, torch.bool)
        return from_slots(self.layout, self._to_rows(planes, 1))

    def _to_rows(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Block rows (``dim``) -> the view's rows: each block's row repeated ``shared_rows`` times (as is for 1)."""
        if self.shared_rows == 1:
            return x
        rows = x.repeat_interleave(self.shared_rows, dim)
        return rows.narrow(dim, 0, _view_rows(self.layout))

    def _times_block_mask(self, weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """``weight * mask`` with the block mask ``(blocks, ...)`` broadcast to each block's rows (no copy of the
        mask when the blocks tile the rows); autograd sums the rows' gradients into the block mask's."""
        s, rows = self.shared_rows, weight.shape[0]
        block = block.to(weight.dtype)
        if rows % s:
            return weight * self._to_rows(block, 0)
        return (weight.view(rows // s, s, *weight.shape[1:]) * block.unsqueeze(1)).reshape(weight.shape)

    def sampler(self, weight: torch.Tensor) -> str:
        """Which implementation a training forward uses for ``weight`` (see ``BACKENDS``)."""
        if not self.hard or self.geometry is None:
            return "planes"
        if torch.compiler.is_compiling():
            return "torch"
        name = _BACKEND["name"]
        numba_ok = USE_NUMBA and weight.device.type == "cpu" and self.logits.dtype == torch.float32
        if name == "auto":
            if weight.is_cuda and sampling_triton.available():
                return "triton"
            return "numba" if numba_ok else "torch"
        if name not in BACKENDS:
            raise SemisparseError(f"unknown mask sampling backend {name!r} (SEMISPARSE_MASK_BACKEND?); expected one "
                                  f"of {', '.join(BACKENDS)}")  # fmt: skip
        if name == "triton" and not (weight.is_cuda or sampling_triton.interpreting()):
            raise SemisparseError(f"mask sampling backend 'triton' runs on CUDA tensors (or under TRITON_INTERPRET=1);"
                                  f" this weight is on {weight.device.type}: use set_backend('auto')")  # fmt: skip
        if name == "numba" and not numba_ok:
            return "torch"
        return name

    def _table_batched(self) -> torch.Tensor:
        """The table as ``(out * cg, P, M)`` (an expanded view, no copy) for the backward's batched matmul."""
        cached = self._batched
        if cached is None or cached[0] is not self.table:
            g = self.geometry
            cached = self._batched = (self.table, self.table.expand(g.out * g.cg, *self.table.shape))
        return cached[1]

    def _host_schedule(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``scale, 1 / tau, scale / tau`` as 0-d CPU float32 tensors, rewritten through numpy when the position
        moved: operands of the lean path that cost no conversion op and no device transfer."""
        if self._sched is None:
            values = torch.zeros(3, dtype=torch.float32)
            self._sched = (values.numpy(), values[0], values[1], values[2], [None])
        arr, scale_t, inv_tau_t, coef_t, at = self._sched
        pos = self._position()
        if at[0] != pos:
            tau, scale = self.schedule(pos)
            arr[:] = (scale, 1.0 / tau, scale / tau)
            at[0] = pos
        return scale_t, inv_tau_t, coef_t

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return weight * self.hard_mask().to(weight.dtype)
        out = self._sample(weight, self.sampler(weight))
        if self.regularizer is not None:
            kind, lam = self.regularizer
            kept, total = None, 1.0
            if kind == "magnitude":
                sq = to_slots(self.layout, weight.detach().to(self.logits.dtype), self.target.m).square()
                total = sq.sum().clamp_min(1e-12)
                kept = slot_weighted(_block_sums(sq, self.shared_rows), self.kept_slots)
            out = RegularizerGrad.apply(out, self.logits, self.allowed, kind, lam, kept, total)
        return out

    def _sample(self, weight: torch.Tensor, path: str) -> torch.Tensor:
        """``weight * sampled mask`` by ``path`` (:meth:`sampler`), advancing the position in backward.

        Shared rows: the samplers see a block-level weight of ones, so what they return is the sampled block
        mask, with their straight-through gradient; it is then broadcast to the block's rows."""
        if self.shared_rows == 1 or path == "planes":  # the planes path broadcasts its block planes itself
            return self._sample_blocks(weight, path)
        block = self._sample_blocks(weight.new_ones(self.block_shape), path)
        return self._times_block_mask(weight, block)

    def _sample_blocks(self, weight: torch.Tensor, path: str) -> torch.Tensor:
        """:meth:`_sample` for a weight with one row per row of logits (block-level with ``shared_rows``)."""
        g = self.geometry
        compiling = torch.compiler.is_compiling()
        if compiling:
            self._host_step = None  # the graph advances the buffer only; eager reads it again once
        if path in ("torch", "compiled"):
            args = (weight, self.logits, self.step, self._table_batched(), self.table, g.out, g.cg, g.taps)
            if path == "compiled":
                self._host_step = None
                return _compiled_lean()(*args, self.tau, self.scale, self.total_steps)
            if compiling:
                sched = schedule_tensors(self.step, self.tau, self.scale, self.total_steps, self.logits.dtype)
                return LeanHardSample.apply(*args, *sched, None)
            return LeanHardSample.apply(*args, *self._host_schedule(), self)
        if compiling:
            scale, inv_tau, _ = schedule_tensors(self.step, self.tau, self.scale, self.total_steps, self.logits.dtype)
            tau, owner = 1.0 / inv_tau, None
        else:
            (tau, scale), owner = self.schedule(), self
        if path == "triton":
            return sampling_triton.TritonHardSample.apply(
                weight, self.logits, self.step, self.table, g.out, g.cg, g.taps, scale, tau, owner
            )
        if path == "numba":
            mask = NumbaHardSample.apply(self.logits, self.step, self.table, self.kept, tuple(weight.shape), scale, tau,
                                         owner)  # fmt: skip
            return weight * mask.to(weight.dtype)
        planes = PlaneSample.apply(
            self.logits, self.step, self.table, self.kept_slots, self.allowed, scale, tau, self.hard, owner
        )
        # (M, rows, G); with hard=True exactly the sampled 0/1 patterns, straight-through gradient
        return weight * from_slots(self.layout, self._to_rows(planes, 1).to(weight.dtype))


def _pair(value: object, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        pair = (float(value), float(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        try:
            pair = (float(value[0]), float(value[1]))
        except (TypeError, ValueError):
            pair = None
    else:
        pair = None
    if pair is None or not all(math.isfinite(v) and v > 0 for v in pair):
        raise SemisparseError(f"{name} must be a positive number or a pair (start, end) of them, got {value!r}")
    return pair


def validate_options(options: Mapping[str, object]) -> dict[str, object]:
    """Options of ``sparsify(method="gumbel")`` with defaults filled in; a one-line error on bad input."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise SemisparseError(
            f"unknown option(s) {', '.join(unknown)} for method='gumbel' (accepted: {', '.join(DEFAULTS)})"
        )
    o = {**DEFAULTS, **options}
    if o["trainable"] not in TRAINABLE:
        raise SemisparseError(f"trainable must be one of {', '.join(map(repr, TRAINABLE))}, got {o['trainable']!r}")
    steps = o["total_steps"]
    if steps is None:
        raise SemisparseError(
            "method='gumbel' needs total_steps=<number of training steps> (the temperature anneals over them)"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise SemisparseError(f"total_steps must be a positive int (training steps), got {steps!r}")
    tau = _pair(o["tau"], "tau")
    if tau[1] > tau[0]:
        raise SemisparseError(f"tau must anneal downwards (start >= end), got start={tau[0]:g} < end={tau[1]:g}")
    o["tau"] = tau
    o["scale"] = _pair(o["scale"], "scale")
    prior = o["prior"]
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not (math.isfinite(prior) and prior >= 0):
        raise SemisparseError(f"prior must be a finite number >= 0 (0 = uniform logits), got {prior!r}")
    for flag in ("hard", "train_bias"):
        if not isinstance(o[flag], bool):
            raise SemisparseError(f"{flag} must be True or False, got {o[flag]!r}")
    shared = o["shared_rows"]
    if isinstance(shared, bool) or not isinstance(shared, int) or shared < 1:
        raise SemisparseError(f"shared_rows must be an int >= 1 (consecutive rows that learn one mask), got {shared!r}")
    if o["bn"] not in BN_MODES:
        raise SemisparseError(f"bn must be one of {', '.join(map(repr, BN_MODES))}, got {o['bn']!r}")
    reg = o["regularizer"]
    if reg is not None:
        if isinstance(reg, str):
            reg = (reg, 1e-3)
        ok = (
            isinstance(reg, Sequence) and len(reg) == 2 and reg[0] in REGULARIZERS
            and isinstance(reg[1], (int, float)) and not isinstance(reg[1], bool) and reg[1] >= 0
        )
        if not ok:
            raise SemisparseError(
                f"regularizer must be None, one of {', '.join(map(repr, REGULARIZERS))} or (name, weight >= 0), "
                f"got {o['regularizer']!r}"
            )
        o["regularizer"] = (reg[0], float(reg[1]))
    return o


def _allowed_patterns(layout: Layout, nm: NM, table: torch.Tensor) -> torch.Tensor | None:
    """For padded kernel-tap layouts: ``(P, 1, G)`` patterns keeping ``min(N, real)`` real slots."""
    if layout.mode != "taps":
        return None
    real = layout.to_view(torch.ones(1, layout.taps), nm.m, fill=0)[0].reshape(-1, nm.m)  # (G, M)
    kept_real = real @ table.float().T  # (G, P)
    return (kept_real == real.sum(-1, keepdim=True).clamp(max=nm.n)).T[:, None, :]


def _view_rows(layout: Layout) -> int:
    """Rows of the layout's ``(rows, K)`` view (a padded layout's are (output, input) channel pairs)."""
    return layout.shape[0] * (layout.shape[1] if layout.mode == "taps" else 1)


def _block_sums(planes: torch.Tensor, rows: int) -> torch.Tensor:
    """``(C, R, G)`` -> ``(C, ceil(R / rows), G)``: sums over each block of ``rows`` consecutive rows, as
    :func:`~semisparse.patterns.shared_row_scores` adds them for the one-shot shared masks."""
    if rows == 1:
        return planes
    c, r, g = planes.shape
    flat = planes.permute(1, 0, 2).reshape(r, c * g)
    return shared_row_scores(flat, rows)[::rows].reshape(-1, c, g).permute(1, 0, 2)


def _block_means(planes: torch.Tensor, rows: int) -> torch.Tensor:
    """:func:`_block_sums` divided by each block's number of rows (the last block may be shorter): a prior
    keeps the strength per row it has without sharing."""
    if rows == 1:
        return planes
    counts = _block_sums(planes.new_ones(1, planes.shape[1], 1), rows)
    return _block_sums(planes, rows) / counts


def prior_logits(w: torch.Tensor, layout: Layout, nm: NM, strength: float, shared_rows: int = 1) -> torch.Tensor:
    """Initial logits ``(P, rows, G)`` from the magnitude the patterns keep, centred per group.

    Scored as ``strength * kept |w| / (N * mean |w|)``: the argmax is the magnitude N:M mask when
    ``strength > 0`` (ties aside); ``strength == 0`` gives uniform logits. ``shared_rows > 1``: one row of
    logits per block of rows, from the block's mean magnitude (its argmax is the shared magnitude mask).
    """
    table = pattern_table(nm.n, nm.m).float().to(w.device)
    planes = to_slots(layout, w.detach().float().abs(), nm.m)  # (M, rows, G)
    planes = _block_means(planes, shared_rows)
    if strength == 0:
        return torch.zeros(table.shape[0], *planes.shape[1:], device=w.device)
    kept = slot_weighted(planes, kept_slots(table))  # (P, rows, G)
    kept = kept / (nm.n * w.detach().float().abs().mean().clamp_min(1e-12))
    return strength * (kept - kept.mean(0, keepdim=True))


def mask_logits(mask: torch.Tensor, layout: Layout, nm: NM, strength: float, shared_rows: int = 1) -> torch.Tensor:
    """Initial logits ``(P, rows, G)`` whose argmax is the given N:M ``mask`` (a calibrated one-shot mask).

    Each pattern scores ``strength`` times the share of the mask's kept slots it keeps, centred per group:
    the mask's own pattern is the only one keeping all N. ``shared_rows > 1``: per block of rows, the share
    of the block's rows keeping each slot (the argmax is a mask shared by the block as is; a per-row mask
    gives each block the pattern its rows keep most).
    """
    table = pattern_table(nm.n, nm.m).float().to(mask.device)
    planes = _block_means(to_slots(layout, mask.float(), nm.m), shared_rows)  # (M, rows, G)
    if strength == 0:
        return torch.zeros(table.shape[0], *planes.shape[1:], device=mask.device)
    kept = slot_weighted(planes, kept_slots(table)) / nm.n  # (P, rows, G)
    return strength * (kept - kept.mean(0, keepdim=True))


def gumbel_parametrizations(
    candidates: Sequence[Candidate],
    pattern: NM | FanIn,
    dense_weight_fn: Callable[[Candidate], torch.Tensor],
    options: Mapping[str, object],
    prior_masks: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[tuple[Candidate, GumbelMask]]:
    """One :class:`GumbelMask` per eligible candidate; validates every option first (model untouched).

    ``prior_masks`` (``{key: (mask, weight)}`` from a calibrated one-shot method) sets the starting argmax
    instead of the magnitude prior.
    """
    o = validate_options(options)
    if not isinstance(pattern, NM):
        raise SemisparseError(f"method='gumbel' learns N:M masks; got {pattern} (use a pattern like '2:4')")
    if math.comb(pattern.m, pattern.n) > MAX_PATTERNS:
        raise SemisparseError(
            f"{pattern} has {math.comb(pattern.m, pattern.n)} patterns per group; method='gumbel' supports at "
            f"most {MAX_PATTERNS} (C(8,4)), e.g. 2:4, 1:4, 4:8"
        )
    table = pattern_table(pattern.n, pattern.m)
    out = []
    for c in candidates:
        w = dense_weight_fn(c)
        shared = o["shared_rows"]
        if prior_masks is not None:
            logits = mask_logits(prior_masks[c.key][0].to(w.device), c.layout, pattern, float(o["prior"]), shared)
        else:
            logits = prior_logits(w, c.layout, pattern, float(o["prior"]), shared)
        allowed = _allowed_patterns(c.layout, pattern, table)
        if allowed is not None:
            allowed = allowed.to(w.device)
            logits = logits.masked_fill(~allowed, 0.0)
        p = GumbelMask(
            c.layout, pattern, logits,
            total_steps=o["total_steps"], tau=o["tau"], scale=o["scale"], hard=o["hard"],
            regularizer=o["regularizer"], allowed=allowed,
            original_requires_grad=bool(getattr(c.module, c.param).requires_grad), shared_rows=shared,
        )
        out.append((c, p))
    return out


def apply_trainable(model: nn.Module, options: Mapping[str, object]) -> list[str]:
    """After registration: set what trains (``trainable``, ``train_bias``, ``bn``); returns report notes.

    ``trainable="mask"``: every parameter but the logits gets ``requires_grad=False`` (so weight decay
    cannot touch the dense weights either), except biases with ``train_bias=True`` and norm-layer affine
    parameters with ``bn="train"``. BatchNorm statistics: ``"recalibrate"`` (default) lets the running
    statistics follow the masked network in training mode; ``"freeze"`` keeps the dense model's statistics
    and normalises with them during training too (a forward pre-hook puts BatchNorm layers in eval mode).
    """
    o = validate_options(options)
    learned = [sw for sw in sparse_weights(model) if isinstance(sw.parametrization, GumbelMask)]
    logits = {id(sw.parametrization.logits) for sw in learned}
    notes = []
    if o["trainable"] == "mask":
        trained_extra = []
        before = getattr(model, "_semisparse_requires_grad", {})
        for name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in logits:
                    continue
                before.setdefault(f"{name}.{pname}" if name else pname, p.requires_grad)
                keep = (o["train_bias"] and pname == "bias" and not isinstance(module, _NORMS)) or (
                    o["bn"] == "train" and isinstance(module, _NORMS)
                )
                p.requires_grad_(keep)
                if keep:
                    trained_extra.append(f"{name}.{pname}" if name else pname)
        model._semisparse_requires_grad = before  # for restore_trainable()
        n_logits = sum(sw.parametrization.logits.numel() for sw in learned)
        what = "mask logits only" if not trained_extra else f"mask logits + {len(trained_extra)} bias/norm tensors"
        notes.append(f"learned masks: trainable=mask ({what}, {n_logits} logits); dense weights frozen")
    else:
        notes.append("learned masks: trainable=all (masks and weights train jointly)")
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn:
        if o["bn"] == "freeze":
            for m in bn:
                if getattr(m, "_semisparse_bn_hook", None) is None:
                    m._semisparse_bn_hook = m.register_forward_pre_hook(_bn_eval_hook)
            notes.append("BatchNorm statistics frozen (normalise with the dense model's running statistics)")
        else:
            notes.append("BatchNorm statistics recalibrated in training mode (running statistics follow the masks)")
    tau, scale = o["tau"], o["scale"]
    notes.append(
        f"tau {tau[0]:g} -> {tau[1]:g}, scale {scale[0]:g} -> {scale[1]:g} over {o['total_steps']} steps, "
        f"{'hard straight-through' if o['hard'] else 'soft'} samples, prior {o['prior']:g}"
        + (f", one mask per block of {o['shared_rows']} rows" if o["shared_rows"] > 1 else "")
    )
    return notes


def restore_trainable(model: nn.Module) -> None:
    """Give back what mask training took: the ``requires_grad`` flags of ``trainable="mask"`` and the
    BatchNorm hooks of ``bn="freeze"`` (the BatchNorm layers they held in eval mode follow the model's mode
    again). ``ss.finalize`` calls this, so a finalized model trains as before; a no-op on other models."""
    for m in model.modules():
        handle = getattr(m, "_semisparse_bn_hook", None)
        if handle is not None:
            handle.remove()
            del m._semisparse_bn_hook
            m.train(model.training)
    before = getattr(model, "_semisparse_requires_grad", None) or {}
    params = dict(model.named_parameters())
    for name, flag in before.items():
        key = re.sub(r"(^|\.)parametrizations\.(\w+)\.original$", r"\1\2", name)  # the weight once finalized
        p = params.get(name, params.get(key))
        if p is not None:
            p.requires_grad_(flag)
    if hasattr(model, "_semisparse_requires_grad"):
        del model._semisparse_requires_grad


def _bn_eval_hook(module: nn.Module, args: object) -> None:
    module.train(False)


def learned_masks(model: nn.Module) -> list[GumbelMask]:
    """Every :class:`GumbelMask` on ``model``, in module order."""
    return [sw.parametrization for sw in sparse_weights(model) if isinstance(sw.parametrization, GumbelMask)]


def set_step(model: nn.Module, step: int) -> None:
    """Pin the annealing position of every learned mask to ``step`` (call after each ``opt.step()``)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise SemisparseError(f"step must be an int >= 0, got {step!r}")
    for p in learned_masks(model):
        if p._host_step != step:  # in step already (each backward advances it): no write, no device op
            p.step.fill_(step)
            p._host_step = step


def temperature(model: nn.Module) -> float | None:
    """The current tau of the model's learned masks (None when it has none), for logging."""
    ps = learned_masks(model)
    return ps[0].schedule()[0] if ps else None


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (what an optimizer gets); an error when there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SemisparseError(
            "nothing to train: no parameter requires grad (trainable='mask' needs learned masks, i.e. "
            "sparsify(..., method='gumbel') first; use trainable='all' to train weights)"
        )
    return params
