"""How learned N:M masks are sampled and differentiated: the torch implementations (and numba's on CPU).

A learned mask (:class:`~semisparse.masking.gumbel.GumbelMask`) holds logits ``(P, rows, G)`` over the
``P = C(M, N)`` keep-patterns of every group of M weights. One training step samples a pattern per group,
``argmax(scale * logits + g)`` with Gumbel noise ``g = -log(-log u)``, multiplies the weight by that 0/1
mask, and sends back the straight-through gradient of ``softmax(y / tau) @ table``::

    d loss / d logits[p] = scale / tau * prob[p] * (gp[p] - sum_q prob[q] * gp[q])
    gp[p] = sum over the slots j pattern p keeps of  d loss / d mask[j] = grad[j] * weight[j]

Three implementations, chosen per call by :mod:`semisparse.masking.gumbel`, all drawing the same uniform
noise ``u = torch.rand_like(logits)`` (same seed, same masks):

* :class:`LeanHardSample` - hard masks on "rows"/"conv" layouts in a fixed number of whole-tensor torch ops
  per layer (a gather of the sampled pattern rows, one batched matmul back), whatever P and M: the path
  for every device Triton does not cover, and the one ``torch.compile`` traces.
* :class:`PlaneSample` - soft masks and padded kernel-tap layouts, as elementwise ops over pattern planes
  (the original formulation; a Python loop over the P patterns, fine for the rare layers that use it).
* :class:`NumbaHardSample` - hard masks on CPU fp32 as two fused numba kernels (``pip install semisparse[fast]``).

The fused Triton kernels for CUDA live in :mod:`semisparse.masking.sampling_triton`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layout import Layout


@dataclass(frozen=True)
class Geometry:
    """A weight seen as ``(out, cg, M, taps)``: groups ``(o, cg, tap)`` of M input channels at one kernel tap.

    For a Linear ``taps == 1``; ``cg`` is the number of groups per output row along the input channels. The
    logits' ``(P, rows, G)`` planes order a row's ``G = cg * taps`` groups as (channel group, tap).
    """

    out: int
    cg: int
    m: int
    taps: int

    @staticmethod
    def of(layout: Layout, m: int) -> Geometry:
        shape = layout.shape
        return Geometry(shape[0], shape[1] // m, m, math.prod(shape[2:]) if len(shape) > 2 else 1)


def schedule_tensors(
    step: torch.Tensor, tau: tuple[float, float], scale: tuple[float, float], total_steps: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale, 1 / tau, scale / tau)`` at the position held in the ``step`` buffer, as 0-d tensors (no host
    read: the form ``torch.compile`` traces; eager mode uses the host-side copy of the position instead)."""
    f = (step.to(dtype) / total_steps).clamp(0.0, 1.0)
    t, s = tau[0] + f * (tau[1] - tau[0]), scale[0] + f * (scale[1] - scale[0])
    return s, 1.0 / t, s / t


def to_slots(layout: Layout, x: torch.Tensor, m: int) -> torch.Tensor:
    """Weight-shaped ``x`` -> ``(M, rows, G)``: plane ``j`` holds slot ``j`` of every group of M.

    Groups are M consecutive input channels at one kernel tap (the layout's N:M groups); for a conv
    ``(out, cin, *k)`` group ``(o, c // M, tap)``, for a Linear ``(o, i // M)``. Padded kernel-tap layouts
    go through the layout's ``(rows, K)`` view.
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


def first_argmax0(y: torch.Tensor) -> torch.Tensor:
    """The index of the largest of the pattern planes ``(P, ...)``, ties to the lower index, as int64.

    On CPU ``max(0)`` (same ties) runs several times faster than ``argmax(0)``, whose reduction over the
    outer dimension is not vectorised; elsewhere ``argmax``.
    """
    if y.device.type == "cpu" and not torch.compiler.is_compiling():
        return y.max(0).indices
    return y.argmax(0)


def gather_mask(idx: torch.Tensor, table_t: torch.Tensor, slot_offsets: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Pattern index ``(rows, G)`` -> the mask ``(out, cg * M * taps)`` in the weight's own element order.

    ``table_t`` is the pattern table transposed and flattened (``table_t[j * P + p] = table[p, j]``) and
    ``slot_offsets`` is ``j * P`` as ``(M, 1)``: one ``take`` writes every slot of every group straight into
    the weight's layout, with no permute of a ``(rows, G, M)`` gather.
    """
    return table_t.take(idx.view(g.out, g.cg, 1, g.taps) + slot_offsets)


def pattern_grad(
    y: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, table_batched: torch.Tensor,
    inv_tau: torch.Tensor, coef: torch.Tensor, g: Geometry,
) -> torch.Tensor:
    """The straight-through gradient w.r.t. the logits ``(P, rows, G)`` (module doc), in whole-tensor ops.

    ``y = scale * logits + gumbel`` as sampled; ``grad * weight`` is the mask's gradient in the weight's
    shape; ``table_batched`` the ``(P, M)`` table expanded to ``(out * cg, P, M)``; ``coef = scale / tau``.
    ``gp`` is one batched matmul of the table with the ``(out * cg, M, taps)`` gradient, and
    ``prob * gp - prob * sum(prob * gp)`` softmax's backward, left in the logits' layout.
    """
    p = table_batched.shape[1]
    gp = torch.bmm(table_batched, torch.mul(grad, weight).reshape(g.out * g.cg, g.m, g.taps))  # (out*cg, P, taps)
    prob = torch.softmax(y * inv_tau, 0).view(p, g.out * g.cg, g.taps)
    tmp = torch.mul(prob, gp.transpose(0, 1))
    return torch.addcmul(tmp, prob, tmp.sum(0), value=-1).mul_(coef).reshape(y.shape)  # a view: prob's layout


class RegularizerGrad(torch.autograd.Function):
    """Identity on the masked weight; its backward adds a regulariser's gradient to the logits'.

    The regulariser acts through the logits' gradient only (no loss term), in closed form - no nested
    autograd, so it traces into ``torch.compile``. ``z`` are the logits with ruled-out patterns at ``-inf``:
    ``"entropy"``: ``lam * mean over groups of H(softmax z)``, gradient ``-lam / groups * p (log p + H)``;
    ``"magnitude"``: ``-lam * sum(softmax(z) @ table * w^2) / sum(w^2)``, with ``kept`` the ``(P, rows, G)``
    squared magnitude each pattern keeps, gradient ``-lam / total * p (kept - sum p kept)``.
    """

    @staticmethod
    def forward(ctx, masked_weight, logits, allowed, kind, lam, kept, total):
        ctx.save_for_backward(logits, allowed, kept)
        ctx.kind, ctx.lam, ctx.total = kind, lam, total
        return masked_weight.view_as(masked_weight)

    @staticmethod
    def backward(ctx, grad):
        logits, allowed, kept = ctx.saved_tensors
        z = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(z, 0)
        if ctx.kind == "entropy":
            logp = torch.log_softmax(z, 0)
            plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
            h = -plogp.sum(0)
            g = torch.where(p > 0, p * (logp + h), torch.zeros_like(p)) * (-ctx.lam / h.numel())
        else:
            g = (p * (kept - (p * kept).sum(0))) * (-ctx.lam / ctx.total)
        return grad, g, None, None, None, None, None


class StepCounter:
    """What a sampler's backward advances: the parametrization's ``step`` buffer and its host-side copy.

    ``owner`` is the :class:`~semisparse.masking.gumbel.GumbelMask` (None inside ``torch.compile``, where the
    host copy is not kept). Reading the buffer on the host would synchronise a GPU once per layer and step.
    """

    @staticmethod
    def advance(step: torch.Tensor, owner: object | None) -> None:
        step.add_(1)
        if owner is not None and owner._host_step is not None:
            owner._host_step += 1


class LeanHardSample(torch.autograd.Function):
    """``weight * mask`` with a hard Gumbel sample of every group's pattern, for "rows"/"conv" layouts.

    Forward: noise, ``y``, the argmax over the pattern planes, one row lookup of the sampled patterns
    ``(out, G, M)`` and the product with the weight seen as ``(out, cg, M, taps)`` (the lookup's slots
    transposed in place: no copy, no index arithmetic). Backward: the weight's gradient ``grad * mask``
    (only when it trains: otherwise no mask is kept) and :func:`pattern_grad` for the logits; advances the
    schedule position. ``scale``, ``1 / tau`` and ``scale / tau`` are 0-d tensors: CPU scalars written by
    the host in eager mode (no conversion op, no device read), device tensors computed from the ``step``
    buffer under ``torch.compile``.
    """

    @staticmethod
    def forward(ctx, weight, logits, step, table_batched, table, out, cg, taps, scale, inv_tau, coef, owner):
        geom = Geometry(out, cg, table.shape[1], taps)
        y = torch.mul(logits, scale)
        y.sub_(torch.rand_like(y).log_().neg_().log_())  # + Gumbel(0, 1) = -log(-log u)
        rows = table[first_argmax0(y)]  # (out, G, M)
        if rows.dtype != weight.dtype:
            rows = rows.to(weight.dtype)
        if taps == 1:
            mask = rows.view(weight.shape)
            res = weight * mask
        else:
            mask = rows.view(out, cg, taps, geom.m).transpose(2, 3)
            res = (weight.reshape(out, cg, geom.m, taps) * mask).reshape(weight.shape)
        ctx.save_for_backward(y, weight, mask if ctx.needs_input_grad[0] else None, step, table_batched, inv_tau, coef)
        ctx.geom, ctx.owner = geom, owner
        return res

    @staticmethod
    def backward(ctx, grad):
        y, weight, mask, step, table_batched, inv_tau, coef = ctx.saved_tensors
        StepCounter.advance(step, ctx.owner)
        g = ctx.geom
        grad_weight = None
        if mask is not None:
            grad_weight = grad * mask if g.taps == 1 else (grad.reshape(g.out, g.cg, g.m, g.taps) * mask).reshape(
                grad.shape)  # fmt: skip
        return grad_weight, pattern_grad(y, grad, weight, table_batched, inv_tau, coef, g), *([None] * 10)


# --- pattern planes: soft masks and padded kernel-tap layouts -------------------------------------------


def argmax0(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and argmax over the pattern planes ``(P, ...)`` (ties: the lower index), as elementwise ops."""
    best = y[0].clone()
    idx = torch.zeros(y.shape[1:], dtype=torch.uint8, device=y.device)
    for p in range(1, y.shape[0]):
        idx.masked_fill_(y[p] > best, p)
        torch.maximum(best, y[p], out=best)
    return best, idx


def kept_slots(table: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """The slots each pattern keeps, as Python ints (computed once: no ``.tolist()`` while tracing)."""
    return tuple(tuple(j for j, k in enumerate(row) if k) for row in table.bool().tolist())


def patterns_to_slots(idx: torch.Tensor, kept: tuple[tuple[int, ...], ...], m: int, dtype: torch.dtype) -> torch.Tensor:
    """Pattern index ``(rows, G)`` -> 0/1 slot planes ``(M, rows, G)``."""
    planes = torch.zeros(m, *idx.shape, dtype=dtype, device=idx.device)
    for p, slots in enumerate(kept):
        hit = idx == p
        for j in slots:
            planes[j].add_(hit)
    return planes


def slot_weighted(planes: torch.Tensor, kept: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """``(M, rows, G)`` -> ``(P, rows, G)``: for each pattern, the sum over the slots it keeps."""
    out = torch.empty(len(kept), *planes.shape[1:], dtype=planes.dtype, device=planes.device)
    for p, slots in enumerate(kept):
        if len(slots) > 1:
            torch.add(planes[slots[0]], planes[slots[1]], out=out[p])
        else:
            out[p].copy_(planes[slots[0]])
        for j in slots[2:]:
            out[p].add_(planes[j])
    return out


def softmax0(y: torch.Tensor, best: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """``softmax(y / tau)`` over the pattern planes, given ``best = y.max(0)``."""
    e = (y - best).div_(tau).exp_()
    return e.div_(e.sum(0))


class PlaneSample(torch.autograd.Function):
    """One Gumbel sample of every group's pattern: logits ``(P, rows, G)`` -> slot planes ``(M, rows, G)``.

    Forward keeps only ``y = scale * logits + gumbel`` (saved for backward) and returns the sampled 0/1
    pattern (``hard``) or ``softmax(y / tau) @ table``; ``allowed`` (padded layouts) rules patterns out.
    Backward is the straight-through gradient through ``softmax(y / tau) @ table`` over pattern planes.
    """

    @staticmethod
    def forward(ctx, logits, step, table, kept, allowed, scale, tau, hard, owner):
        y = logits.detach() * scale
        if allowed is not None:
            y.masked_fill_(~allowed, float("-inf"))
        y.sub_(torch.rand_like(y).log_().neg_().log_())
        best, idx = argmax0(y)
        if hard:
            out = patterns_to_slots(idx, kept, table.shape[1], logits.dtype)
        else:
            out = torch.einsum("prg,pm->mrg", softmax0(y, best, tau), table)
        ctx.save_for_backward(y, best, step)
        ctx.kept, ctx.scale, ctx.tau, ctx.owner = kept, scale, tau, owner
        return out

    @staticmethod
    def backward(ctx, grad):
        y, best, step = ctx.saved_tensors
        StepCounter.advance(step, ctx.owner)
        prob = softmax0(y, best, ctx.tau)  # (P, rows, G)
        gp = slot_weighted(grad.contiguous(), ctx.kept)  # d/dprob of (prob @ table)
        dot = (prob * gp).sum(0)
        g = prob.mul_(gp.sub_(dot)).mul_(ctx.scale / ctx.tau)
        return g, *([None] * 8)


# --- numba: fused CPU kernels (optional) ----------------------------------------------------------------

try:
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


def _numba_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class NumbaHardSample(torch.autograd.Function):
    """A hard sample for "rows"/"conv" layouts on CPU fp32 as two fused numba kernels: one pass over the
    logits each way, the mask written straight in the weight's layout. Returns the mask."""

    @staticmethod
    def forward(ctx, logits, step, table, kept, shape, scale, tau, owner):
        npat, rows, groups = logits.shape
        cin, taps, m = shape[1], math.prod(shape[2:]), table.shape[1]
        lg = logits.detach().contiguous().reshape(npat, -1)
        u = torch.rand_like(lg)
        y = torch.empty_like(lg)
        mask = torch.empty(math.prod(shape), dtype=lg.dtype)
        _numba_threads()
        _nb_forward(lg.numpy(), u.numpy(), float(scale), table.numpy(), y.numpy(), mask.numpy(), groups, cin, taps, m)
        ctx.save_for_backward(y, kept, step)
        ctx.scale, ctx.tau, ctx.owner = scale, tau, owner
        ctx.geom = (logits.shape, groups, cin, taps, m)
        return mask.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        y, kept, step = ctx.saved_tensors
        StepCounter.advance(step, ctx.owner)
        lshape, groups, cin, taps, m = ctx.geom
        out = torch.empty_like(y)
        g = grad.detach().to(y.dtype).contiguous().reshape(-1)
        _numba_threads()
        _nb_backward(y.numpy(), g.numpy(), kept.numpy(), 1.0 / ctx.tau, ctx.scale / ctx.tau, out.numpy(),
                     groups, cin, taps, m)  # fmt: skip
        return out.reshape(lshape), *([None] * 7)
