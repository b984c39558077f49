"""The kernels as Python functions: each checks its arguments (:mod:`.binding`), then calls the C entry
point of the loaded library (:mod:`.build`), or runs its pure-torch reference where there is none."""

from __future__ import annotations

import ctypes

import torch

from ....indices import columns
from . import build
from .binding import (
    BLOCK,
    Stale,
    Table,
    _bad,
    _check,
    _check_conv_plan,
    _check_reads,
    _check_rows,
    _check_segments,
    _check_table,
    _check_vectors,
    _check_writes,
    _ConvPlan,
    _fits,
    _GemvPlan,
    _Held,
    _ptr,
    _stamp,
    reads_input_as_is,
    table,
)
from .build import _seen, _threads


def split_by_blocks(P: int, PB: int, rows: int, threads: int, prefer_blocks: bool = False) -> int:  # noqa: N803
    """1: threads take position blocks (each sweeps every row); 0: threads take rows (each sweeps every block).

    Static scheduling hands each thread a run of ceil(nb / threads) blocks: with few blocks, or a short last
    one, that leaves a thread idle (14x14 = 196 positions in blocks of 64 split 128 : 68). Rows of a constant
    fan-in layer all cost the same, so rows split evenly whenever there are enough of them. ``prefer_blocks``
    (Linear panels, where splitting rows makes every thread stream every panel: measured 1.4-1.7x slower
    at 197-256 tokens): blocks whenever each thread gets one.
    """
    if threads <= 1:
        return 1
    if rows < threads:
        return 1
    nb = -(-P // PB)
    if prefer_blocks:
        return int(nb >= threads)
    per = -(-nb // threads)
    busiest = min(per * PB, P)  # positions of the first (fullest) thread
    return int(busiest * threads <= 1.1 * P)


def offsets(idx: torch.Tensor, coff: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``off[r, j] = base[r] + coff[idx[r, j]]`` as int32: the element offset of each kept weight's input.

    Built once per input geometry (and cached by the layer): the kernel then does one load per kept
    weight instead of two dependent ones. Raises ValueError where an offset does not fit int32.
    """
    off = base[:, None] + coff[columns(idx)]
    if off.numel() and int(off.max()) >= 2**31:
        raise ValueError("activation buffer too large for int32 offsets")
    return off.to(torch.int32).contiguous()


def spmm(
    X: torch.Tensor,
    W: torch.Tensor,
    off: torch.Tensor,
    bias: torch.Tensor | None,
    orow: torch.Tensor,
    Y: torch.Tensor,
    P: int,
    ldy: int,
    PB: int,
    panel: int,
    ldp: int = 1,
    pairs: bool = False,
    prefer_blocks: bool = False,
    rows4: bool = False,
) -> None:
    """``Y[orow[r]*ldy + p*ldp] = bias[r] + sum_j W[r, j] * X[(p//PB)*panel + off[r, j] + p%PB]``.

    ``X`` flat fp32 (readable up to ``BLOCK`` elements past the last real position), ``W`` (rows, k) fp32,
    ``off`` (rows, k) int32 from :func:`offsets`, ``orow`` (rows,) int64 (both tensors or :class:`Table`),
    ``Y`` fp32 with row stride ``ldy`` and position stride ``ldp``; positions ``p < P``; ``PB`` a multiple of
    8, at most ``BLOCK``. All contiguous, on CPU. ``pairs=True`` (needs ``PB == 32``) runs two rows per pass.
    ``rows4=True`` (``PB == 24``, rows in blocks of 4 with the same offsets; ``ldp == 1``, or ``ldy == 1`` with
    each block's 4 ``orow`` adjacent): four rows per loaded input, ``W`` in :func:`rows4_values` order.
    """
    off, orow = table(off), table(orow)
    rows, k = _check_rows(W, off, bias, orow)
    if PB not in (8, 16, 24, 32, 40, 48, 56, 64) or (pairs and PB != 32):
        raise _bad(f"PB must be a multiple of 8 from 8 to 64 (32 with pairs=True), got {PB}")
    if rows4 and (PB != 24 or pairs or not off.rows_in_fours()
                  or (ldp != 1 and (ldy != 1 or not orow.adjacent_in_fours()))):
        raise _bad("rows4 needs PB 24, rows in blocks of 4 with the same offsets, and contiguous output rows or "
                   "(ldy 1) each block's 4 output rows adjacent")
    _check_reads(X, off, P, PB, panel, exact=False)
    _check_writes(Y, orow, P, ldy, ldp)
    lib = build.library()
    if lib is None:
        if rows4:
            W = W.view(rows // 4, k, 4).transpose(1, 2).reshape(rows, k)  # back to row order
        return spmm_reference(X, W, off._t, bias, orow._t, Y, P, ldy, PB, panel, ldp)
    if rows4:
        _threads(lib)
        lib.ss_spmm_rows4(X.data_ptr(), W.data_ptr(), off.data_ptr(), _ptr(bias), orow.data_ptr(), Y.data_ptr(),
                          rows, k, P, ldy, ldp, panel)
        return
    by_blocks = split_by_blocks(P, PB, rows, _threads(lib), prefer_blocks)
    if pairs:
        lib.ss_spmm_pairs(X.data_ptr(), W.data_ptr(), off.data_ptr(), _ptr(bias), orow.data_ptr(), Y.data_ptr(),
                          rows, k, P, ldy, ldp, panel, by_blocks)
        return
    lib.ss_spmm(X.data_ptr(), W.data_ptr(), off.data_ptr(), _ptr(bias), orow.data_ptr(), Y.data_ptr(),
                rows, k, P, ldy, ldp, PB, panel, by_blocks)


def rows4_values(W: torch.Tensor) -> torch.Tensor:  # noqa: N803
    """``W (rows, k)`` with each block of 4 rows interleaved, ``[b, j, i] = W[4b + i, j]``, as the rows4
    kernels read it (one 4-float load per kept input of a block)."""
    rows, k = W.shape
    return W.view(rows // 4, 4, k).transpose(1, 2).contiguous().view(rows, k)


def rows4_by_offset(W4: torch.Tensor, off: Table) -> tuple[torch.Tensor, Table]:  # noqa: N803
    """Each block's kept inputs in the order of their offsets: ``W4`` (:func:`rows4_values` order) and ``off``
    permuted alike. A kxk conv's inputs come tap by tap, each tap across the channels; in memory order the
    taps of one channel row follow each other and share cache lines (1.10-1.17x on ResNet-50's 3x3 convs at
    7x7 and 14x14, measured; the same at 56x56)."""
    t = off._t
    rows, k = t.shape
    order = torch.argsort(t[::4], dim=1, stable=True)  # (blocks, k): a block's rows share the first's offsets
    W = W4.view(rows // 4, k, 4).gather(1, order[:, :, None].expand(-1, -1, 4)).reshape(rows, k)
    return W.contiguous(), Table(t.gather(1, order.repeat_interleave(4, 0)).contiguous())


def tile(W: torch.Tensor, off: torch.Tensor, channel: torch.Tensor, per_tile: int):  # noqa: N803
    """Sort each row's kept weights by input offset and cut them into tiles of ``per_tile`` input channels.

    ``channel`` (rows, k) is the input channel of each weight (offsets grow with it). Returns ``(W, off, seg)``
    sorted, with ``seg`` (rows, nt + 1) int32: row ``r``'s weights of tile ``t`` are ``seg[r, t]:seg[r, t + 1]``.
    """
    if isinstance(off, Table):
        off = off._t
    order = torch.argsort(off, dim=1, stable=True)
    tid = channel.gather(1, order) // max(1, per_tile)
    rows = W.shape[0]
    nt = int(tid.max()) + 1 if tid.numel() else 1
    counts = torch.zeros(rows, nt, dtype=torch.int64).scatter_add_(1, tid, torch.ones_like(tid))
    seg = torch.cat([torch.zeros(rows, 1, dtype=torch.int64), counts.cumsum(1)], 1).to(torch.int32)
    return W.gather(1, order).contiguous(), off.gather(1, order).contiguous(), seg.contiguous()


def spmm_tiled(
    X: torch.Tensor,
    W: torch.Tensor,
    off: torch.Tensor,
    seg: torch.Tensor,
    bias: torch.Tensor | None,
    orow: torch.Tensor,
    Y: torch.Tensor,
    P: int,
    ldy: int,
    PB: int,
    panel: int,
    ldp: int = 1,
) -> None:
    """:func:`spmm` over input-channel tiles (``W``, ``off``, ``seg`` from :func:`tile`; ``PB`` 32 or 64).

    Same result as :func:`spmm` up to summation order; ``X`` needs no slack past position ``P``.
    """
    if PB not in (32, 64):
        raise _bad(f"tiled spmm needs PB 32 or 64, got {PB}")
    off, orow = table(off), table(orow)
    rows, k = _check_rows(W, off, bias, orow)
    if not isinstance(seg, (torch.Tensor, Table)) or seg.dim() != 2 or seg.shape[0] != rows or seg.shape[1] < 2:
        raise _bad(f"seg must be a (rows={rows}, tiles + 1) tensor")
    seg = table(seg)
    _check_table(seg, "seg", (torch.int32,))
    _check_segments(seg, k)
    _check_reads(X, off, P, PB, panel, exact=True)
    _check_writes(Y, orow, P, ldy, ldp)
    lib = build.library()
    if lib is None:
        return spmm_reference(X, W, off._t, bias, orow._t, Y, P, ldy, PB, panel, ldp)
    by_blocks = split_by_blocks(P, PB, rows, _threads(lib))
    rc = lib.ss_spmm_tiled(X.data_ptr(), W.data_ptr(), off.data_ptr(), seg.data_ptr(), seg.shape[1] - 1,
                           _ptr(bias), orow.data_ptr(), Y.data_ptr(), rows, k, P, ldy, ldp, PB, panel, by_blocks)
    if rc != 0:
        raise MemoryError("semisparse: could not allocate the tiled kernel's scratch rows")


def scratch(slot: str, numel: int) -> torch.Tensor:
    """A reused fp32 work buffer of ``numel`` elements for this Python thread (contents undefined).

    Layers run one after another, so their temporaries (the padded input, the uncropped output) share one
    buffer per slot instead of allocating and faulting in fresh pages on every call. The caller must not
    return it or keep it past its own call.
    """
    bufs = _seen.__dict__.setdefault("scratch", {})
    buf = bufs.get(slot)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1024))
        bufs[slot] = buf
    return buf[:numel]


def fill_rows(Y: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor, ldy: int, P: int, ldp: int = 1) -> None:  # noqa: N803
    """``Y[rows[i]*ldy + p*ldp] = vals[i]`` for ``p < P`` (the outputs of rows that are not computed)."""
    if not isinstance(rows, (torch.Tensor, Table)) or rows.dim() != 1:
        raise _bad("rows must be a 1-D tensor")
    rows = table(rows)
    _check_table(rows, "rows", (torch.int64,))
    _check(vals, "vals", torch.float32, tuple(rows.shape))
    _check_writes(Y, rows, P, ldy, ldp)
    lib = build.library()
    if lib is None:
        flat = Y.view(-1)
        for i, r in enumerate(rows._t.tolist()):
            flat[r * ldy: r * ldy + (P - 1) * ldp + 1: ldp] = vals[i]
        return
    lib.ss_fill_rows(Y.data_ptr(), rows.data_ptr(), vals.data_ptr(), len(rows), ldy, P, ldp)


def maxpool2d(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
              out_hw: tuple[int, int]) -> torch.Tensor | None:
    """Max pooling of a contiguous fp32 ``(..., H, W)`` tensor (dilation 1) into ``(..., *out_hw)``; None
    without the kernel library (the caller then runs torch's)."""
    _check(x, "x", torch.float32)
    if x.dim() < 2:
        raise _bad(f"x must be (..., H, W), got shape {tuple(x.shape)}")
    (kh, kw), (sh, sw), (ph, pw), (ho, wo) = kernel, stride, padding, out_hw
    H, W = x.shape[-2:]
    # every output row / column's window starts inside the input (after clipping the padding)
    if min(kh, kw, sh, sw) < 1 or min(ph, pw, ho, wo) < 0 or (ho and (ho - 1) * sh - ph > H - 1) or (
            wo and (wo - 1) * sw - pw > W - 1) or ((ho or wo) and min(H, W) < 1):  # fmt: skip
        raise _bad(f"pooling {kernel}/{stride}/{padding} to {out_hw} does not fit a {H}x{W} input")
    lib = build.library()
    if lib is None:
        return None
    _threads(lib)
    out = torch.empty(*x.shape[:-2], *out_hw)
    planes = x.numel() // max(1, H * W)
    if lib.ss_maxpool2d(x.data_ptr(), out.data_ptr(), planes, H, W, *out_hw, *kernel, *stride, *padding) != 0:
        raise MemoryError("semisparse: could not allocate the max-pooling kernel's row buffer")
    return out


def transpose(src: torch.Tensor) -> torch.Tensor:
    """``src (R, C)`` contiguous fp32 -> ``(C, R)`` contiguous (8x8 register blocks; torch's own strided copy
    is several times slower here)."""
    if not isinstance(src, torch.Tensor) or src.dim() != 2:
        raise _bad("src must be a 2-D tensor")
    _check(src, "src", torch.float32)
    R, C = src.shape
    lib = build.library()
    if lib is None:
        return src.t().contiguous()
    _threads(lib)
    out = torch.empty(C, R)
    lib.ss_transpose(src.data_ptr(), out.data_ptr(), R, C, C, R)
    return out


def pack_panels(x: torch.Tensor, PB: int) -> torch.Tensor:  # noqa: N803
    """``x`` (B, K) -> flat panels ``(ceil(B/PB), K, PB)`` (zero rows past B) plus ``BLOCK`` floats of slack."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise _bad("x must be a (B, K) tensor")
    _check(x, "x", torch.float32)
    if not isinstance(PB, int) or PB < 1:
        raise _bad(f"PB must be a positive int, got {PB!r}")
    B, K = x.shape
    npan = -(-B // PB)
    out = torch.empty(npan * K * PB + BLOCK, dtype=x.dtype)
    lib = build.library()
    if lib is None:
        xp = torch.zeros(npan * PB, K, dtype=x.dtype)
        xp[:B] = x
        out[: npan * K * PB].view(npan, K, PB).copy_(xp.view(npan, PB, K).transpose(1, 2))
    else:
        _threads(lib)
        lib.ss_pack_panels(x.data_ptr(), out.data_ptr(), B, K, PB)
    out[npan * K * PB :].zero_()
    return out


#: Batch-1 kernel variants: x values loaded as scalars and packed, or hardware gathers.
GEMV_VARIANTS = ("packed", "gather")


def gemv(
    x: torch.Tensor, W: torch.Tensor, idx: torch.Tensor | Table, bias: torch.Tensor | None,
    orow: torch.Tensor | Table, y: torch.Tensor, variant: str = "packed",
) -> None:
    """Batch-1 Linear: ``y[orow[r]] = bias[r] + sum_j W[r, j] * x[idx[r, j]]``; ``x`` (K,), ``y`` (out,)."""
    idx, orow = table(idx, True), table(orow)
    run = gemv_binding(W, idx, bias, orow, variant)
    if run is None:
        _check_vectors(x, y, idx.hi + 1, orow.hi + 1)
        return gemv_reference(x, W, idx._t, bias, orow._t, y)
    run(x, y)


def gemv_binding(W: torch.Tensor, idx: torch.Tensor | Table, bias: torch.Tensor | None,  # noqa: N803
                 orow: torch.Tensor | Table, variant: str = "packed"):
    """:func:`gemv` with everything but ``x`` and ``y`` bound once: ``run(x, y)``; None without kernels.
    ``W`` fp32, or bf16 (read as bf16: half the bytes; products and sums in fp32).

    A batch-1 layer call is a few tens of microseconds, so per-call argument handling is a visible share
    of it: the bound call passes one pointer to a prepared argument block plus ``x`` and ``y``, after checking
    that they hold what the bound indices address. The indices are read from private copies (:class:`Table`)
    made here; ``W`` and ``bias`` are held (:class:`_Held`). ``run`` raises :class:`Stale` ("bind again") once
    ``W`` or ``bias`` was replaced or resized, or ``idx`` / ``orow`` (when given as tensors) changed in a way
    torch records; changes torch does not record are never read (the copies are).
    """
    sources = tuple(t for t in (idx, orow) if isinstance(t, torch.Tensor))
    stamps = tuple(_stamp(t) for t in sources)
    idx, orow = table(idx, True), table(orow)
    bf16 = isinstance(W, torch.Tensor) and W.dtype == torch.bfloat16  # half the bytes, fp32 arithmetic
    _check_rows(W, idx, bias, orow, off_dtype=torch.int16, w_dtype=torch.bfloat16 if bf16 else torch.float32)
    if variant not in GEMV_VARIANTS:
        raise _bad(f"variant must be one of {GEMV_VARIANTS}, got {variant!r}")
    nx, ny = idx.hi + 1, orow.hi + 1
    if orow.lo < 0 or idx.lo < 0:
        raise _bad("negative index")
    lib = build.library()
    if lib is None:
        return None
    rows, k = W.shape
    held = tuple(_Held(t) for t in (W, bias) if t is not None)
    plan = _GemvPlan(W.data_ptr(), idx.data_ptr(), _ptr(bias), orow.data_ptr(), rows, k,
                     int(idx.dtype != torch.int16), int(variant != "packed"), int(bf16), 0)
    plan_ref, fn, threads = ctypes.byref(plan), lib.ss_gemv_run, _threads
    f32 = torch.float32

    def run(x: torch.Tensor, y: torch.Tensor, _keep=plan, _tables=(idx, orow)) -> None:
        if not (x.dtype == f32 and y.dtype == f32 and x.is_cpu and y.is_cpu and x.is_contiguous()
                and y.is_contiguous() and x.numel() >= nx and y.numel() >= ny and _fits(x) and _fits(y)):
            _check_vectors(x, y, nx, ny)
        if not all(h.ok() for h in held):
            raise Stale("semisparse kernels: the bound weights were replaced or resized; bind again")
        if sources and tuple(_stamp(t) for t in sources) != stamps:
            raise Stale("semisparse kernels: the bound indices were changed in place; bind again")
        threads(lib)
        fn(plan_ref, x.data_ptr(), y.data_ptr())

    return run


def conv2d_binding(geometry: dict, W: torch.Tensor, off: torch.Tensor | Table, seg: torch.Tensor | Table | None,  # noqa: N803
                   bias: torch.Tensor | None, orow: torch.Tensor | Table, ablated: torch.Tensor | Table,
                   ablated_vals: torch.Tensor, PB: int, kind: int, out_channels: int):
    """One C call for a whole batch-1 2-D convolution (pad, product, crop, ablated rows): ``run(x, out)``.

    ``geometry``: ``C, H0, W0, sh, sw, H, W, pt, pl, Hp, Wp, cs, stH, stW, Hq, Wq, P, Ho, Wo`` (input channels
    and size, the 1x1 subsampling steps, the padded size, the stride phases and their planes, positions,
    output size). ``kind`` 0: one row per pass
    (``PB`` 8-64), 1: row pairs (``PB`` 32), 2: channel tiles (``seg``, ``PB`` 32 or 64), 3: blocks of 4 rows
    with the same offsets (``PB`` 24; ``W`` in :func:`rows4_values` order). None without kernels.
    The plan is checked once (:func:`_check_conv_plan`) on private copies of the index tables (:class:`Table`);
    ``run`` checks ``x`` is ``(C, H0, W0)`` and ``out`` ``(out_channels, Ho, Wo)`` worth of contiguous fp32, holds
    the float tensors (:class:`_Held`), and raises :class:`Stale` once one was replaced or resized, or an index
    tensor given as a tensor changed in a way torch records.
    """
    sources = tuple(t for t in (off, seg, orow, ablated) if isinstance(t, torch.Tensor))
    stamps = tuple(_stamp(t) for t in sources)
    off, orow, ablated = table(off), table(orow), table(ablated)
    seg = None if seg is None else table(seg)
    _check_conv_plan(geometry, W, off, seg, bias, orow, ablated, ablated_vals, PB, kind, out_channels)
    lib = build.library()
    if lib is None:
        return None
    rows, k = W.shape
    g = geometry
    plan = _ConvPlan(
        *(g[n] for n in ("C", "H0", "W0", "sh", "sw", "H", "W", "pt", "pl", "Hp", "Wp", "cs", "stH", "stW", "Hq",
                         "Wq")),
        W.data_ptr(), off.data_ptr(), _ptr(seg), _ptr(bias), orow.data_ptr(), ablated.data_ptr(),
        ablated_vals.data_ptr(), rows, k, 1 if seg is None else seg.shape[1] - 1, g["P"], PB, kind,
        0, out_channels, g["Ho"], g["Wo"], len(ablated), int(reads_input_as_is(g, off, kind, PB)))
    plan_ref, fn, split_for = ctypes.byref(plan), lib.ss_conv2d_run, [0]
    nx, ny = g["C"] * g["H0"] * g["W0"], out_channels * g["Ho"] * g["Wo"]
    held = tuple(_Held(t) for t in (W, bias, ablated_vals) if t is not None)

    def run(x: torch.Tensor, out: torch.Tensor, _keep=plan, _tables=(off, seg, orow, ablated)) -> None:
        if not (x.dtype == torch.float32 and out.dtype == torch.float32 and x.is_cpu and out.is_cpu
                and x.is_contiguous() and out.is_contiguous() and x.numel() == nx and out.numel() == ny
                and _fits(x) and _fits(out)):
            _check_vectors(x, out, nx, ny)
            raise _bad(f"x must hold {nx} and out {ny} elements, got {x.numel()} and {out.numel()}")
        if not all(h.ok() for h in held):
            raise Stale("semisparse kernels: the bound weights were replaced or resized; bind again")
        if sources and tuple(_stamp(t) for t in sources) != stamps:
            raise Stale("semisparse kernels: the bound tensors were changed in place; bind again")
        threads = _threads(lib)
        if split_for[0] != threads:  # how threads share the work depends on their number only
            _keep.by_blocks, split_for[0] = split_by_blocks(g["P"], PB, rows, threads), threads
        if fn(plan_ref, x.data_ptr(), out.data_ptr()) != 0:
            raise MemoryError("semisparse: could not allocate the convolution's work buffers")

    return run


def spmm_reference(X, W, off, bias, orow, Y, P, ldy, PB, panel, ldp=1) -> None:  # noqa: N803
    """Pure-torch :func:`spmm` (the fallback and the tests' oracle for the index arithmetic)."""
    p = torch.arange(P, device=X.device)
    addr = off.to(torch.int64)[:, :, None] + ((p // PB) * panel + p % PB)[None, None, :]
    out = (W[:, :, None] * X[addr]).sum(1)
    if bias is not None:
        out = out + bias[:, None]
    if len(orow):
        Y.view(-1).as_strided((int(orow.max()) + 1, P), (ldy, ldp))[orow] = out


def gemv_reference(x, W, idx, bias, orow, y) -> None:
    out = (W * x[columns(idx)]).sum(1)
    if bias is not None:
        out = out + bias
    y[orow] = out
