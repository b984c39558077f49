"""Fused Triton kernels for learned N:M masks on CUDA: one kernel per layer forward, one backward.

Forward (:func:`_forward_kernel`): for a block of groups, ``y = scale * logits - log(-log u)`` over the P
patterns, the argmax pattern, its M slots looked up in the table, and ``weight * mask`` written in the
weight's own layout (contiguous or channels-last); ``y`` is kept for backward. Backward
(:func:`_backward_kernel`): ``softmax(y / tau)``, the per-pattern sums of ``grad * weight`` over kept slots,
the straight-through gradient of the logits (:mod:`semisparse.masking.sampling`'s formula) and, when the
weight trains, ``grad * mask`` - from the same saved ``y`` (the argmax again), so no mask is stored.

The noise is ``torch.rand_like(logits)``, drawn by torch: the same seed gives the same masks as the torch
path, and a run can switch paths. The kernels are built on first use, so ``TRITON_INTERPRET=1`` set by a
test before that runs them on CPU tensors. Nothing here is used unless Triton imports (the
:mod:`~semisparse.masking.gumbel` backend "auto" picks it for CUDA tensors only).
"""

from __future__ import annotations

import os

import torch

from .sampling import StepCounter

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    """True when Triton imports (kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``)."""
    return triton is not None


def why_unavailable() -> str:
    return _IMPORT_ERROR or "available"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_KERNELS: dict[bool, tuple] = {}


def _kernels() -> tuple:
    """The jitted kernels, built once per mode (compiled, or interpreted under ``TRITON_INTERPRET=1``)."""
    mode = interpreting()
    if mode not in _KERNELS:
        _KERNELS[mode] = (triton.jit(_forward_kernel), triton.jit(_backward_kernel))
    return _KERNELS[mode]


def _forward_kernel(
    logits_ptr, u_ptr, y_ptr, w_ptr, out_ptr, table_ptr, n, G, TAPS, s_o, s_c, s_t, scale,
    P: tl.constexpr, M: tl.constexpr, P_PAD: tl.constexpr, M_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    g = pid * BLOCK + tl.arange(0, BLOCK)
    p_idx = tl.arange(0, P_PAD)
    m_idx = tl.arange(0, M_PAD)
    gmask = g < n
    pmask = p_idx < P
    lmask = gmask[:, None] & pmask[None, :]
    loff = p_idx[None, :].to(tl.int64) * n + g[:, None]
    lg = tl.load(logits_ptr + loff, mask=lmask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + loff, mask=lmask, other=0.5).to(tl.float32)
    y = lg * scale - tl.log(-tl.log(u))
    tl.store(y_ptr + loff, y, mask=lmask)
    y = tl.where(pmask[None, :], y, float("-inf"))
    best = tl.argmax(y, axis=1, tie_break_left=True)  # (BLOCK,)
    smask = gmask[:, None] & (m_idx[None, :] < M)
    keep = tl.load(table_ptr + best[:, None] * M + m_idx[None, :], mask=smask, other=0.0)
    o = g // G  # group (o, channel group, tap) -> its M slots' offsets in the strided weight
    rem = g - o * G
    cgi = rem // TAPS
    t = rem - cgi * TAPS
    base = o.to(tl.int64) * s_o + (cgi * M).to(tl.int64) * s_c + t.to(tl.int64) * s_t
    woff = base[:, None] + m_idx[None, :].to(tl.int64) * s_c
    w = tl.load(w_ptr + woff, mask=smask, other=0.0)
    tl.store(out_ptr + woff, w * keep.to(w.dtype), mask=smask)


def _backward_kernel(
    y_ptr, gout_ptr, w_ptr, gl_ptr, gw_ptr, table_ptr, n, G, TAPS, s_o, s_c, s_t, inv_tau, coef,
    P: tl.constexpr, M: tl.constexpr, P_PAD: tl.constexpr, M_PAD: tl.constexpr, BLOCK: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    g = pid * BLOCK + tl.arange(0, BLOCK)
    p_idx = tl.arange(0, P_PAD)
    m_idx = tl.arange(0, M_PAD)
    gmask = g < n
    pmask = p_idx < P
    lmask = gmask[:, None] & pmask[None, :]
    loff = p_idx[None, :].to(tl.int64) * n + g[:, None]
    y = tl.load(y_ptr + loff, mask=lmask, other=0.0)
    y = tl.where(pmask[None, :], y, float("-inf"))  # padded patterns never win; padded groups stay finite
    top = tl.max(y, axis=1)
    e = tl.exp((y - top[:, None]) * inv_tau)
    e = tl.where(pmask[None, :], e, 0.0)
    prob = e / tl.sum(e, axis=1)[:, None]  # (BLOCK, P_PAD)
    smask = gmask[:, None] & (m_idx[None, :] < M)
    o = g // G  # group (o, channel group, tap) -> its M slots' offsets in the strided weight
    rem = g - o * G
    cgi = rem // TAPS
    t = rem - cgi * TAPS
    base = o.to(tl.int64) * s_o + (cgi * M).to(tl.int64) * s_c + t.to(tl.int64) * s_t
    woff = base[:, None] + m_idx[None, :].to(tl.int64) * s_c
    gout = tl.load(gout_ptr + woff, mask=smask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + woff, mask=smask, other=0.0).to(tl.float32)
    gm = gout * w  # (BLOCK, M_PAD): d loss / d mask
    tmask = pmask[:, None] & (m_idx[None, :] < M)
    tbl = tl.load(table_ptr + p_idx[:, None] * M + m_idx[None, :], mask=tmask, other=0.0)  # (P_PAD, M_PAD)
    gp = tl.sum(gm[:, None, :] * tbl[None, :, :], axis=2)  # (BLOCK, P_PAD)
    dot = tl.sum(prob * gp, axis=1)
    tl.store(gl_ptr + loff, prob * (gp - dot[:, None]) * coef, mask=lmask)
    if WEIGHT_GRAD:
        best = tl.argmax(y, axis=1, tie_break_left=True)
        keep = tl.load(table_ptr + best[:, None] * M + m_idx[None, :], mask=smask, other=0.0)
        tl.store(gw_ptr + woff, gout * keep, mask=smask)


def _strides(weight: torch.Tensor) -> tuple[int, int, int] | None:
    """``(s_out, s_in, s_tap)`` when the kernel taps flatten to one stride (contiguous and channels-last do)."""
    if weight.dim() == 2:
        return weight.stride(0), weight.stride(1), 0
    st, sizes = weight.stride(), weight.shape
    for d in range(2, weight.dim() - 1):
        if sizes[d + 1] != 1 and st[d] != st[d + 1] * sizes[d + 1]:
            return None
    return st[0], st[1], st[-1]


def _block(p_pad: int, m_pad: int) -> int:
    return max(16, min(256, 4096 // (p_pad * m_pad)))


class TritonHardSample(torch.autograd.Function):
    """``weight * mask`` with a hard Gumbel sample per group, as one fused Triton kernel each way (module doc).

    Same arguments and results as :class:`~semisparse.masking.sampling.LeanHardSample` (the table only;
    the geometry as ``out, cg, taps``).
    """

    @staticmethod
    def forward(ctx, weight, logits, step, table, out, cg, taps, scale, tau, owner):
        fwd, _ = _kernels()
        npat, m = table.shape
        if _strides(weight) is None:
            weight = weight.contiguous()
        s_o, s_c, s_t = _strides(weight)
        lg = logits.detach().contiguous()
        u = torch.rand_like(lg)
        y = torch.empty(lg.shape, dtype=torch.float32, device=lg.device)
        res = torch.empty_like(weight)
        tab = table.to(torch.float32).contiguous()
        n = out * cg * taps
        p_pad, m_pad = triton.next_power_of_2(npat), triton.next_power_of_2(m)
        block = _block(p_pad, m_pad)
        fwd[(triton.cdiv(n, block),)](
            lg, u, y, weight, res, tab, n, cg * taps, taps, s_o, s_c, s_t, float(scale),
            P=npat, M=m, P_PAD=p_pad, M_PAD=m_pad, BLOCK=block,
        )  # fmt: skip
        ctx.save_for_backward(y, weight, tab, step)
        ctx.geom = (n, cg * taps, taps, p_pad, m_pad, block)
        ctx.scale, ctx.tau, ctx.owner = scale, tau, owner
        ctx.logits_dtype = logits.dtype
        return res

    @staticmethod
    def backward(ctx, grad):
        _, bwd = _kernels()
        y, weight, tab, step = ctx.saved_tensors
        StepCounter.advance(step, ctx.owner)
        n, groups, taps, p_pad, m_pad, block = ctx.geom
        npat, m = tab.shape
        if _strides(grad) != _strides(weight):
            grad = grad.contiguous() if weight.is_contiguous() else grad.contiguous(memory_format=_format(weight))
            if _strides(grad) != _strides(weight):  # pragma: no cover - exotic layouts
                grad, weight = grad.contiguous(), weight.contiguous()
        s_o, s_c, s_t = _strides(weight)
        gl = torch.empty_like(y)
        wants_w = ctx.needs_input_grad[0]
        gw = torch.empty_like(weight) if wants_w else gl
        bwd[(triton.cdiv(n, block),)](
            y, grad, weight, gl, gw, tab, n, groups, taps, s_o, s_c, s_t, 1.0 / float(ctx.tau),
            float(ctx.scale) / float(ctx.tau), P=npat, M=m, P_PAD=p_pad, M_PAD=m_pad, BLOCK=block,
            WEIGHT_GRAD=wants_w,
        )  # fmt: skip
        return (gw if wants_w else None), gl.to(ctx.logits_dtype), *([None] * 8)


def _format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
