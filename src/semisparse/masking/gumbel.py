"""Learned N:M masks: a Gumbel-softmax over the C(M, N) keep-patterns of every group (MaskLLM-style).

Every group of M weights along the reduction axis (the layout's ``(rows, K)`` view, groups of M along K)
owns C(M, N) logits, one per pattern of the constant pattern table (a non-trainable buffer, ``(P, M)``;
the masking seed made it a parameter and every "mask" went dense). The logits are compact,
``(C(M, N), rows, K // M)`` (pattern planes; a row's K // M groups ordered (channel group, kernel tap)),
and live in the state_dict next to the dense weight, with the schedule position::

    conv1.parametrizations.weight.original    # dense weight (frozen with trainable="mask")
    conv1.parametrizations.weight.0.logits    # (C(M, N), rows, K // M), trained
    conv1.parametrizations.weight.0.step      # schedule position (int64 scalar buffer)

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
``prior`` magnitude-prior strength (3; 0 = uniform); ``hard`` straight-through 0/1 samples (True) or soft
masks; ``regularizer`` None | "entropy" | "magnitude" | (name, weight), applied through the logits'
gradient (no extra loss term to add); ``train_bias`` (False); ``bn`` "recalibrate" | "freeze" | "train"
(see :func:`apply_trainable`).

Speed: sampling and its gradient are one pass over the logits each way (fused numba kernels when numba is
installed, CPU fp32; elementwise torch ops over pattern planes otherwise, also on GPU).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import SemisparseError
from ..layout import Candidate, Layout
from ..patterns import MAX_PATTERNS, NM, FanIn, pattern_table
from .parametrization import SparseParametrization, sparse_weights

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
}
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def to_slots(layout: Layout, x: torch.Tensor, m: int) -> torch.Tensor:
    """Weight-shaped ``x`` -> ``(M, rows, G)``: plane ``j`` holds slot ``j`` of every group of M.

    Groups are M consecutive input channels at one kernel tap (the layout's N:M groups); for a conv
    ``(out, cin, *k)`` group ``(o, c // M, tap)``, for a Linear ``(o, i // M)``. Padded kernel-tap layouts
    go through the layout's ``(rows, K)`` view. Planes make every per-group operation an elementwise op
    over ``rows * G`` contiguous values (reductions over a trailing axis of 4-8 are slow on CPU).
    """
    if layout.mode == "taps":
        v = layout.to_view(x, m, fill=0)
        return v.reshape(v.shape[0], -1, m).permute(2, 0, 1).contiguous()
    out, cin = x.shape[0], x.shape[1]
    return x.reshape(out, cin // m, m, -1).permute(2, 0, 1, 3).reshape(m, out, -1)


def from_slots(layout: Layout, planes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_slots`: ``(M, rows, G)`` -> weight-shaped (padding dropped)."""
    m = planes.shape[0]
    if layout.mode == "taps":
        return layout.from_view(planes.permute(1, 2, 0).reshape(planes.shape[1], -1))
    out, cin = layout.shape[0], layout.shape[1]
    return planes.reshape(m, out, cin // m, -1).permute(1, 2, 0, 3).reshape(layout.shape)


def _argmax0(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and argmax over the pattern planes ``(P, ...)`` (ties: the lower index), as elementwise ops."""
    best = y[0].clone()
    idx = torch.zeros(y.shape[1:], dtype=torch.uint8, device=y.device)
    for p in range(1, y.shape[0]):
        idx.masked_fill_(y[p] > best, p)
        torch.maximum(best, y[p], out=best)
    return best, idx


def _patterns_to_slots(idx: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pattern index ``(rows, G)`` -> 0/1 slot planes ``(M, rows, G)``."""
    planes = torch.zeros(table.shape[1], *idx.shape, dtype=dtype, device=idx.device)
    for p, row in enumerate(table.bool().tolist()):
        hit = idx == p
        for j, keep in enumerate(row):
            if keep:
                planes[j].add_(hit)
    return planes


def _slot_weighted(planes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(M, rows, G)`` -> ``(P, rows, G)``: for each pattern, the sum over the slots it keeps."""
    out = torch.empty(table.shape[0], *planes.shape[1:], dtype=planes.dtype, device=planes.device)
    for p, row in enumerate(table.bool().tolist()):
        kept = [j for j, k in enumerate(row) if k]
        torch.add(planes[kept[0]], planes[kept[1]], out=out[p]) if len(kept) > 1 else out[p].copy_(planes[kept[0]])
        for j in kept[2:]:
            out[p].add_(planes[j])
    return out


class _SampledPatterns(torch.autograd.Function):
    """One Gumbel sample of every group's pattern: logits ``(P, rows, G)`` -> slot planes ``(M, rows, G)``.

    Forward keeps only ``y = scale * logits + gumbel`` (saved for backward) and returns the sampled 0/1
    pattern (``hard``) or ``softmax(y / tau) @ table``. Backward is the straight-through gradient through
    ``softmax(y / tau) @ table``, written out over pattern planes. It also advances the schedule position
    (once per backward pass: reading ``module.weight`` never moves it) and adds the gradient of an
    optional regulariser ``fn(logits)``.
    """

    @staticmethod
    def forward(ctx, logits, step, table, allowed, scale, tau, hard, fn):
        y = logits.detach() * scale
        if allowed is not None:
            y.masked_fill_(~allowed, float("-inf"))
        y.sub_(torch.rand_like(y).log_().neg_().log_())  # + Gumbel(0, 1) = -log(-log(u))
        best, idx = _argmax0(y)
        if hard:
            out = _patterns_to_slots(idx, table, logits.dtype)
        else:
            out = torch.einsum("prg,pm->mrg", _softmax0(y, best, tau), table)
        ctx.save_for_backward(y, best, table, logits if fn is not None else None)
        ctx.step, ctx.scale, ctx.tau, ctx.fn = step, scale, tau, fn
        return out

    @staticmethod
    def backward(ctx, grad):
        y, best, table, logits = ctx.saved_tensors
        ctx.step.add_(1)
        prob = _softmax0(y, best, ctx.tau)  # (P, rows, G)
        gp = _slot_weighted(grad.contiguous(), table)  # d/dprob of (prob @ table)
        dot = (prob * gp).sum(0)
        g = prob.mul_(gp.sub_(dot)).mul_(ctx.scale / ctx.tau)
        if ctx.fn is not None:
            with torch.enable_grad():
                leaf = logits.detach().requires_grad_(True)
                (extra,) = torch.autograd.grad(ctx.fn(leaf), leaf)
            g = g + extra
        return g, None, None, None, None, None, None, None


try:  # optional: fused CPU kernels (the "fast" extra); the torch code above is the reference
    import numba
    import numpy as np

    @numba.njit(parallel=True, cache=True)
    def _nb_forward(logits, u, scale, table, y, mask, groups, cin, taps, m):  # pragma: no cover - jitted
        npat, total = logits.shape
        for gg in numba.prange(total):
            best = -np.inf
            bi = 0
            for p in range(npat):
                v = logits[p, gg] * scale - np.log(-np.log(u[p, gg]))
                y[p, gg] = v
                if v > best:
                    best = v
                    bi = p
            r = gg // groups
            rem = gg - r * groups
            gi = rem // taps
            base = (r * cin + gi * m) * taps + (rem - gi * taps)
            for j in range(m):
                mask[base + j * taps] = table[bi, j]

    @numba.njit(parallel=True, cache=True)
    def _nb_backward(y, grad, kept, inv_tau, coef, out, groups, cin, taps, m):  # pragma: no cover - jitted
        npat, total = y.shape
        nkeep = kept.shape[1]
        for gg in numba.prange(total):
            r = gg // groups
            rem = gg - r * groups
            gi = rem // taps
            base = (r * cin + gi * m) * taps + (rem - gi * taps)
            mx = -np.inf
            for p in range(npat):
                mx = max(mx, y[p, gg])
            s = 0.0
            for p in range(npat):
                e = np.exp((y[p, gg] - mx) * inv_tau)
                out[p, gg] = e
                s += e
            dot = 0.0
            for p in range(npat):
                gp = 0.0
                for k in range(nkeep):
                    gp += grad[base + kept[p, k] * taps]
                prob = out[p, gg] / s
                out[p, gg] = prob
                dot += prob * gp
            for p in range(npat):
                gp = 0.0
                for k in range(nkeep):
                    gp += grad[base + kept[p, k] * taps]
                out[p, gg] = out[p, gg] * (gp - dot) * coef

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is optional
    HAVE_NUMBA = False


class _FusedHardSample(torch.autograd.Function):
    """:class:`_SampledPatterns` with ``hard=True`` for "rows"/"conv" layouts on CPU fp32, as two fused numba
    kernels: one pass over the logits each way, the mask written straight in the weight's layout."""

    @staticmethod
    def forward(ctx, logits, step, table, kept, shape, scale, tau, fn):
        npat, rows, groups = logits.shape
        cin, taps, m = shape[1], math.prod(shape[2:]), table.shape[1]
        lg = logits.detach().contiguous().reshape(npat, -1)
        u = torch.rand_like(lg)
        y = torch.empty_like(lg)
        mask = torch.empty(math.prod(shape), dtype=lg.dtype)
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _nb_forward(lg.numpy(), u.numpy(), float(scale), table.numpy(), y.numpy(), mask.numpy(), groups, cin, taps, m)
        ctx.save_for_backward(y, kept, logits if fn is not None else None)
        ctx.step, ctx.scale, ctx.tau, ctx.fn, ctx.geom = step, scale, tau, fn, (logits.shape, groups, cin, taps, m)
        return mask.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        y, kept, logits = ctx.saved_tensors
        ctx.step.add_(1)
        lshape, groups, cin, taps, m = ctx.geom
        out = torch.empty_like(y)
        g = grad.detach().to(y.dtype).contiguous().reshape(-1)
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _nb_backward(y.numpy(), g.numpy(), kept.numpy(), 1.0 / ctx.tau, ctx.scale / ctx.tau, out.numpy(),
                     groups, cin, taps, m)  # fmt: skip
        out = out.reshape(lshape)
        if ctx.fn is not None:
            with torch.enable_grad():
                leaf = logits.detach().requires_grad_(True)
                (extra,) = torch.autograd.grad(ctx.fn(leaf), leaf)
            out = out + extra
        return out, None, None, None, None, None, None, None


#: Use the fused numba kernels where they apply (tests switch this off to check the torch path).
USE_NUMBA = HAVE_NUMBA


def _softmax0(y: torch.Tensor, best: torch.Tensor, tau: float) -> torch.Tensor:
    """``softmax(y / tau)`` over the pattern planes, given ``best = y.max(0)``."""
    e = (y - best).div_(tau).exp_()
    return e.div_(e.sum(0))


class GumbelMask(SparseParametrization):
    """``weight = original * mask(logits)``; logits ``(C(M, N), rows, G)`` over the pattern table.

    Logits are stored as pattern planes (``logits[p]`` scores pattern ``p`` for every group; ``rows`` and
    ``G`` as in :func:`to_slots`) so that sampling runs as elementwise ops. ``allowed`` (padded kernel-tap
    layouts only) is a ``(P, 1, G)`` bool table of the patterns that never keep a padding slot in preference
    to a real weight; the same for every row.
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
    ) -> None:
        super().__init__(layout, nm)
        self.register_buffer("table", pattern_table(nm.n, nm.m).to(logits.dtype), persistent=False)
        self.logits = nn.Parameter(logits)
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=logits.device))
        self.register_buffer("allowed", allowed, persistent=False)
        kept = self.table.bool().nonzero()[:, 1].reshape(len(self.table), nm.n)  # (P, N) kept slots
        self.register_buffer("kept", kept, persistent=False)
        self.total_steps = int(total_steps)
        self.tau = (float(tau[0]), float(tau[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.hard = bool(hard)
        self.regularizer = regularizer
        self.original_requires_grad = original_requires_grad

    def extra_repr(self) -> str:
        return (
            f"{self.target}, logits={tuple(self.logits.shape)}, tau={self.tau}, scale={self.scale}, "
            f"total_steps={self.total_steps}, hard={self.hard}"
        )

    def schedule(self, step: int | None = None) -> tuple[float, float]:
        """``(tau, scale)`` at ``step`` (default: the current position), linear, constant after the end."""
        s = int(self.step) if step is None else step
        f = min(max(s, 0), self.total_steps) / self.total_steps
        return (
            self.tau[0] + f * (self.tau[1] - self.tau[0]),
            self.scale[0] + f * (self.scale[1] - self.scale[0]),
        )

    def _masked_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.allowed is None:
            return logits
        return logits.masked_fill(~self.allowed, float("-inf"))

    def pattern_index(self) -> torch.Tensor:
        """The argmax pattern of every group, ``(rows, G)`` int64 (ties: the lower index)."""
        return _argmax0(self._masked_logits(self.logits.detach()))[1].long()

    def hard_mask(self) -> torch.Tensor:
        idx = _argmax0(self._masked_logits(self.logits.detach()))[1]
        return from_slots(self.layout, _patterns_to_slots(idx, self.table, torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return weight * self.hard_mask()
        tau, scale = self.schedule()
        reg = None if self.regularizer is None else self._regularizer_fn(weight.detach())
        if (
            USE_NUMBA and self.hard and self.layout.mode != "taps" and self.logits.device.type == "cpu"
            and self.logits.dtype == torch.float32
        ):
            mask = _FusedHardSample.apply(
                self.logits, self.step, self.table, self.kept, tuple(weight.shape), scale, tau, reg
            )
            return weight * mask.to(weight.dtype)
        planes = _SampledPatterns.apply(self.logits, self.step, self.table, self.allowed, scale, tau, self.hard, reg)
        # (M, rows, G); with hard=True exactly the sampled 0/1 patterns, straight-through gradient
        return weight * from_slots(self.layout, planes.to(weight.dtype))

    def _regularizer_fn(self, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        kind, lam = self.regularizer
        if kind == "entropy":

            def entropy(logits: torch.Tensor) -> torch.Tensor:
                logp = torch.log_softmax(self._masked_logits(logits), 0)
                return lam * -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(0).mean()

            return entropy
        sq = to_slots(self.layout, weight.to(self.logits.dtype), self.target.m).square()  # (M, rows, G)
        total = sq.sum().clamp_min(1e-12)

        def kept_magnitude(logits: torch.Tensor) -> torch.Tensor:
            probs = torch.softmax(self._masked_logits(logits), 0)
            return -lam * (torch.einsum("prg,pm->mrg", probs, self.table) * sq).sum() / total

        return kept_magnitude


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


def prior_logits(w: torch.Tensor, layout: Layout, nm: NM, strength: float) -> torch.Tensor:
    """Initial logits ``(P, rows, G)`` from the magnitude the patterns keep, centred per group.

    Scored as ``strength * kept |w| / (N * mean |w|)``: the argmax is the magnitude N:M mask when
    ``strength > 0`` (ties aside); ``strength == 0`` gives uniform logits.
    """
    table = pattern_table(nm.n, nm.m).float().to(w.device)
    planes = to_slots(layout, w.detach().float().abs(), nm.m)  # (M, rows, G)
    if strength == 0:
        return torch.zeros(table.shape[0], *planes.shape[1:], device=w.device)
    kept = _slot_weighted(planes, table)  # (P, rows, G)
    kept = kept / (nm.n * w.detach().float().abs().mean().clamp_min(1e-12))
    return strength * (kept - kept.mean(0, keepdim=True))


def gumbel_parametrizations(
    candidates: Sequence[Candidate],
    pattern: NM | FanIn,
    dense_weight_fn: Callable[[Candidate], torch.Tensor],
    options: Mapping[str, object],
) -> list[tuple[Candidate, GumbelMask]]:
    """One :class:`GumbelMask` per eligible candidate; validates every option first (model untouched)."""
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
        logits = prior_logits(w, c.layout, pattern, float(o["prior"]))
        allowed = _allowed_patterns(c.layout, pattern, table)
        if allowed is not None:
            allowed = allowed.to(w.device)
            logits = logits.masked_fill(~allowed, 0.0)
        p = GumbelMask(
            c.layout, pattern, logits,
            total_steps=o["total_steps"], tau=o["tau"], scale=o["scale"], hard=o["hard"],
            regularizer=o["regularizer"], allowed=allowed,
            original_requires_grad=bool(getattr(c.module, c.param).requires_grad),
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
        p.step.fill_(step)


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
