"""Condensed constant fan-in layers on a GPU: Triton kernels, their launch wrappers and two ``nn.Module``\\ s.

The CPU condensed form (:mod:`..cpu.layers`) keeps, per output neuron that keeps any weight, its ``k`` kept
values and their input columns; ablated neurons (all-zero mask rows) are not computed, their output is their
bias (or 0). The GPU form here holds the same information, laid out for one Triton kernel:

* ``values`` ``(R, k)`` in the layer's dtype (fp32, bf16 or fp16; the kernel accumulates in fp32), rows
  padded with zeros to a multiple of 16 entries so every row starts aligned and its loads vectorise;
* ``idx`` ``(R, k)`` (padded alike): input columns, uint16 bits in int16 while ``in_features <= 65,536``,
  else int32;
* ``perm`` ``(out,)`` int64: the output channel of each kernel row, the R kept rows first, then the ablated
  ones (which the kernel writes as their bias without loading anything);
* ``bias_p`` ``(out,)`` (or ``None``): the bias in ``perm`` order.

One kernel serves a Linear, an MHA projection (a Linear) and a 1x1 convolution in either memory format: the
input is addressed as ``x[n, p, c]`` and the output as ``y[n, p, o]`` through strides, so channels-last
(``(N*H*W, C)`` rows) and NCHW (``(C, H*W)`` per sample, a gather then reads a contiguous run of positions)
both run without copies. A program computes ``BO`` rows x ``BB`` positions over a range of ``k`` (split-k:
``split`` programs per tile write fp32 partials that a second kernel sums, adds the bias, casts and
scatters), reducing a ``(BO, BK)`` weight tile against the gathered ``(BO, BK, BB)`` inputs. Batch 1 runs a
2-D variant (``BB == 1``) whose threads span ``k``. Large Linear batches may transpose the input to
``(in, batch)`` first (``transpose_input``) so a gather reads one contiguous run of the batch.

Interface for the GPU planner::

    from semisparse.runtime.cuda import kernels as tc
    if tc.available():                               # triton imports and CUDA is present
        layer = tc.build(module, mask)               # nn.Linear / 1x1 ConvNd + bool mask -> module or None
        layer = layer.to(device="cuda", dtype=dtype)  # buffers follow .to() like any module
        for cfg in tc.candidates(layer, x):          # a few KernelConfig for this input's batch
            layer.use_config(cfg)                    # ... time layer(x) (graphed), keep the fastest
        layer.use_config(best)                       # None: a heuristic pick per call

``tc.launch`` runs the kernel on any ``(N, P, in)`` / ``(N, P, out)`` strided views (for a caller with its
own buffers); ``tc.configs_for(positions, fan_in, elem_bytes)`` is the config space without a layer.
``layer(x)`` has ``nn.Linear``'s (``nn.ConvNd``'s) contract: same shapes, dtype in = dtype out, bias added,
ablated outputs = bias. Inputs that need gradients run the expanded dense weight through torch.
On CPU tensors the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1``; tests).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SemisparseError
from ...indices import columns, store

try:  # optional: machines without Triton import this module and report available() == False
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

__all__ = ["KernelConfig", "TritonCondensedLinear", "TritonCondensedConv", "available", "interpreting",
           "build", "candidates", "configs_for", "launch", "unsupported_reason"]

def available() -> bool:
    """Triton imports and a CUDA device is present: the GPU planner may build and time these layers."""
    return triton is not None and torch.cuda.is_available()


def interpreting() -> bool:
    """The Triton interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors (slowly; for tests)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------------------
# Kernels (plain functions; jitted on first use, so the interpreter setting read is the one at launch time)


def _cf_kernel(x_ptr, v_ptr, i_ptr, b_ptr, perm_ptr, y_ptr,
               P, R, OUT, K, KP, KS, n_pblk, n_oblk,
               sxn, sxp, sxc, syn, syp, syo, spart,
               BO: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr, SPLIT: tl.constexpr,
               U16: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y[n, p, perm[r]] = sum_j values[r, j] * x[n, p, idx[r, j]] + bias_p[r]`` for a ``(BO, BB)`` tile
    over ``j < K`` in this program's split (rows ``KP`` apart: aligned, vector loads); SPLIT > 1 writes fp32
    partials ``y[split, n*P + p, r]`` instead."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    ob = pid % n_oblk  # output blocks vary fastest: programs that run together share one input panel
    rest = pid // n_oblk
    pb = rest % n_pblk
    n = (rest // n_pblk).to(tl.int64)
    rows = ob * BO + tl.arange(0, BO)
    kept = rows < R  # rows R..OUT-1 are ablated: nothing loaded, acc stays 0
    k_lo = split * KS
    k_hi = tl.minimum(k_lo + KS, K)
    k_end = tl.minimum(k_lo + KS, KP)  # weights / indices past K are zero padding: loads masked to KP vectorise
    x_base = x_ptr + n * sxn
    if BB == 1:
        x_base += pb * sxp
        acc2 = tl.zeros((BO, BK), dtype=tl.float32)  # reduced over k once, after the loop
        for k0 in range(k_lo, k_hi, BK):
            kk = k0 + tl.arange(0, BK)
            mw = kept[:, None] & (kk < k_end)[None, :]
            off = rows[:, None] * KP + kk[None, :]
            w = tl.load(v_ptr + off, mask=mw, other=0.0, eviction_policy="evict_first").to(tl.float32)
            j = tl.load(i_ptr + off, mask=mw, other=0, eviction_policy="evict_first").to(tl.int32)
            if U16:
                j = j & 0xFFFF
            m = kept[:, None] & (kk < k_hi)[None, :]
            xv = tl.load(x_base + j * sxc, mask=m, other=0.0, eviction_policy="evict_last").to(tl.float32)
            acc2 += w * xv
        acc1 = tl.sum(acc2, axis=1)
        if SPLIT == 1:
            live = rows < OUT
            if HAS_BIAS:
                acc1 += tl.load(b_ptr + rows, mask=live, other=0.0).to(tl.float32)
            orow = tl.load(perm_ptr + rows, mask=live, other=0)
            tl.store(y_ptr + n * syn + pb * syp + orow * syo, acc1.to(y_ptr.dtype.element_ty), mask=live)
        else:
            tl.store(y_ptr + split * spart + (n * P + pb) * OUT + rows, acc1, mask=rows < OUT)
    else:
        pos = pb * BB + tl.arange(0, BB)
        pok = pos < P
        acc3 = tl.zeros((BO, BK, BB), dtype=tl.float32)  # FMAs only in the loop; one reduction after it
        for k0 in range(k_lo, k_hi, BK):
            kk = k0 + tl.arange(0, BK)
            mw = kept[:, None] & (kk < k_end)[None, :]
            off = rows[:, None] * KP + kk[None, :]
            w = tl.load(v_ptr + off, mask=mw, other=0.0, eviction_policy="evict_first").to(tl.float32)
            j = tl.load(i_ptr + off, mask=mw, other=0, eviction_policy="evict_first").to(tl.int32)
            if U16:
                j = j & 0xFFFF
            m = kept[:, None] & (kk < k_hi)[None, :]
            xoff = j[:, :, None] * sxc + pos[None, None, :] * sxp
            xm = m[:, :, None] & pok[None, None, :]
            xv = tl.load(x_base + xoff, mask=xm, other=0.0, eviction_policy="evict_last").to(tl.float32)
            acc3 += w[:, :, None] * xv
        acc = tl.sum(acc3, axis=1)
        live = rows < OUT
        tile = live[:, None] & pok[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows, mask=live, other=0.0).to(tl.float32)[:, None]
            orow = tl.load(perm_ptr + rows, mask=live, other=0)
            yoff = n * syn + orow[:, None] * syo + pos[None, :] * syp
            tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=tile)
        else:
            poff = split * spart + (n * P + pos[None, :]) * OUT + rows[:, None]
            tl.store(y_ptr + poff, acc, mask=tile)


def _cf_reduce_kernel(part_ptr, b_ptr, perm_ptr, y_ptr, M, P, OUT, spart, syn, syp, syo,
                      SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr):
    """Split-k second pass: sum the ``SPLIT`` fp32 partials ``(SPLIT, M, OUT)``, add the bias, cast, and
    scatter row ``r`` of position ``m = n*P + p`` to ``y[n, p, perm[r]]``."""
    ms = tl.program_id(0) * BM + tl.arange(0, BM)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    live = rows < OUT
    tile = (ms < M)[:, None] & live[None, :]
    off = ms[:, None] * OUT + rows[None, :]
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + s * spart + off, mask=tile, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=live, other=0.0).to(tl.float32)[None, :]
    orow = tl.load(perm_ptr + rows, mask=live, other=0)
    n = (ms // P).to(tl.int64)
    p = ms % P
    yoff = n[:, None] * syn + p[:, None] * syp + orow[None, :] * syo
    tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=tile)


_JITTED: dict[bool, tuple] = {}


def _kernels() -> tuple:
    """``(main, reduce)`` jitted for the current interpreter setting (decorated lazily, once per setting)."""
    if triton is None:
        raise SemisparseError("triton is not installed; the condensed GPU kernels need it (pip install triton)")
    key = interpreting()
    got = _JITTED.get(key)
    if got is None:
        got = _JITTED[key] = (triton.jit(_cf_kernel), triton.jit(_cf_reduce_kernel))
    return got


# --------------------------------------------------------------------------------------------------------------
# Kernel settings


@dataclass(frozen=True)
class KernelConfig:
    """One kernel setting the planner may time: a program computes ``block_out`` rows x ``block_batch``
    positions, ``block_k`` kept inputs per step, ``split`` programs per tile along ``k`` (>1: fp32
    partials + a reduce pass); ``transpose_input``: a Linear copies its input to ``(in, batch)`` first."""

    block_out: int
    block_k: int
    block_batch: int
    split: int = 1
    num_warps: int = 4
    transpose_input: bool = False

    @property
    def name(self) -> str:
        t = "-xt" if self.transpose_input else ""
        return f"bo{self.block_out}-bk{self.block_k}-bb{self.block_batch}-s{self.split}-w{self.num_warps}{t}"

    def __post_init__(self) -> None:
        for f in ("block_out", "block_k", "block_batch"):
            v = getattr(self, f)
            if v < 1 or v & (v - 1):
                raise SemisparseError(f"KernelConfig.{f} must be a power of two, got {v}")
        if self.split < 1 or self.num_warps not in (1, 2, 4, 8, 16):
            raise SemisparseError(f"KernelConfig needs split >= 1 and num_warps in 1/2/4/8/16, got {self}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def configs_for(positions: int, fan_in: int, elem_bytes: int = 4) -> list[KernelConfig]:
    """The settings worth timing for ``positions`` rows of input (batch, or N*H*W for a 1x1 conv), a fan-in
    of ``fan_in`` kept inputs per neuron and ``elem_bytes`` per input element (4 fp32, 2 bf16/fp16).

    Batch 1: threads along k, a few outputs per program or many with split-k. Up to 64: a batch tile of up
    to 16, split-k. Larger: either a 32-byte batch tile (8 fp32 / 16 bf16) whose input panel, ``in x 32``
    bytes, stays in L1 while a program sweeps many outputs, or wide 32/64 tiles that read whole cache
    lines. The first is the heuristic default (used when no config is set)."""
    return list(_configs(min(positions, 65), fan_in, elem_bytes))


@functools.lru_cache(maxsize=512)
def _configs(positions: int, fan_in: int, elem_bytes: int) -> tuple[KernelConfig, ...]:
    kcap = max(2, _pow2(max(fan_in, 1)))

    def cfg(bo, bk, bb, split=1, warps=None, xt=False):
        bk = min(bk, kcap)
        if warps is None:
            warps = 4 if bo * bk * bb <= 4096 else 8
        return KernelConfig(bo, bk, bb, split, warps, xt)

    if positions <= 1:
        out = [cfg(4, 128, 1), cfg(8, 64, 1), cfg(2, 128, 1, warps=2), cfg(16, 64, 1, split=2),
               cfg(16, 128, 1, split=4), cfg(32, 64, 1, split=4, warps=8), cfg(4, 64, 1, warps=2)]
    elif positions <= 64:
        bb = min(_pow2(positions), 16)
        out = [cfg(16, 16, bb, xt=True), cfg(32, 8, bb, xt=True), cfg(16, 16, bb, split=2, xt=True),
               cfg(8, 32, bb, split=4, xt=True), cfg(32, 16, bb, split=2, xt=True), cfg(16, 16, bb),
               cfg(8, 32, min(bb, 8)), cfg(64, 8, min(_pow2(positions), 32), xt=True)]
    else:
        line = max(1, 32 // elem_bytes)  # one 32-byte sector of the transposed input per gather
        out = [cfg(64, 8, line, xt=True), cfg(128, 4, line, xt=True), cfg(128, 8, line, xt=True),
               cfg(256, 4, line, xt=True), cfg(64, 4, 2 * line, xt=True),
               cfg(32, 4, 32, xt=True), cfg(64, 4, 32, xt=True), cfg(32, 8, 32, xt=True),
               cfg(16, 8, 64, xt=True), cfg(64, 2, 64, xt=True)]
    return tuple(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------------------------
# Building the condensed form


def _condense(weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None):
    """``(out, in)`` weight + mask -> ``values (R, k)``, ``idx (R, k)``, ``perm (out,)``, ``bias_p``, R.

    Reads the mask, never the zeros of the weight. Rows with fewer than ``k`` kept weights are padded
    with zero weights at column 0. Indices ascend within a row (locality of the gathers)."""
    if weight.dim() != 2 or mask.shape != weight.shape:
        raise SemisparseError(f"need a 2-D weight and a mask of its shape, got {tuple(weight.shape)} and "
                              f"{tuple(mask.shape)}")
    out_f, in_f = weight.shape
    m = mask.to(device=weight.device, dtype=torch.bool)
    counts = m.sum(1)
    kept = torch.nonzero(counts, as_tuple=False).flatten()
    ablated = torch.nonzero(counts == 0, as_tuple=False).flatten()
    k = max(int(counts.max()) if kept.numel() else 0, 1)
    order = torch.sort((~m[kept]).to(torch.int8), dim=1, stable=True).indices[:, :k]  # kept columns first
    valid = torch.arange(k, device=weight.device)[None, :] < counts[kept][:, None]
    cols = torch.where(valid, order, torch.zeros_like(order))
    values = torch.gather(weight.detach()[kept], 1, cols) * valid
    return _pack(values, cols, kept, ablated, in_f, bias)


def _pack(values, cols, kept, ablated, in_f, bias):
    """Rows padded to a multiple of 16 entries (zeros, never read): every row starts 16-element aligned,
    so the kernel's weight and index loads vectorise."""
    k = values.shape[1]
    pad = -k % 16
    if pad:
        values, cols = F.pad(values, (0, pad)), F.pad(cols, (0, pad))
    idx = store(cols, in_f)
    perm = torch.cat([kept, ablated]).to(torch.int64)
    bias_p = None if bias is None else bias.detach()[perm].to(values.dtype).contiguous()
    return values.contiguous(), idx.contiguous(), perm.contiguous(), bias_p, int(kept.numel()), k


# --------------------------------------------------------------------------------------------------------------
# Modules


class TritonCondensedLinear(nn.Module):
    """Condensed ``nn.Linear`` run by the Triton kernel. ``x (..., in) -> (..., out)``; same dtype in and out."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self._set(*_condense(weight, mask, bias))

    def _set(self, values, idx, perm, bias_p, n_kept, fan_in) -> None:
        self.register_buffer("values", values)
        self.register_buffer("idx", idx)
        self.register_buffer("perm", perm)
        self.register_buffer("bias_p", bias_p)
        self.n_kept = n_kept
        self.fan_in = fan_in  # kept inputs per neuron; values / idx rows are padded to 16
        self.config: KernelConfig | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor) -> TritonCondensedLinear:
        """The condensed form of ``linear`` under ``mask`` (its dtype and device)."""
        return cls(linear.weight.detach(), mask, linear.bias)

    @classmethod
    def from_condensed(cls, values: torch.Tensor, idx: torch.Tensor, orow: torch.Tensor, in_features: int,
                       out_features: int, bias: torch.Tensor | None = None) -> TritonCondensedLinear:
        """From the CPU condensed form (:func:`semisparse.runtime.cpu.layers.condense`'s ``values (R, k)``,
        ``idx (R, k)`` int16 uint16-bits or int32, ``orow (R,)``) without the dense weight."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = int(out_features), int(in_features)
        orow = orow.to(torch.int64)
        ablated = torch.ones(out_features, dtype=torch.bool, device=orow.device)
        ablated[orow] = False
        if values.shape[1] == 0:
            values, idx = values.new_zeros(values.shape[0], 1), idx.new_zeros(idx.shape[0], 1)
        self._set(*_pack(values, columns(idx), orow, torch.nonzero(ablated).flatten(), in_features, bias))
        return self

    # -- what the planner uses

    def configs(self, x: torch.Tensor) -> list[KernelConfig]:
        """Settings worth timing for input ``x`` (see :func:`configs_for`)."""
        return configs_for(self._positions(x), self.fan_in, x.element_size())

    def use_config(self, config: KernelConfig | None) -> None:
        """Run every call with ``config`` (``None``: the heuristic default for each call's batch)."""
        if config is not None and not isinstance(config, KernelConfig):
            raise SemisparseError(f"use_config takes a KernelConfig or None, got {type(config).__name__}")
        self.config = config

    def dense_weight(self) -> torch.Tensor:
        """The masked dense ``(out, in)`` weight this layer computes (tests, the gradient fallback)."""
        w = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        if self.n_kept:
            rows = self.perm[: self.n_kept]
            k = self.fan_in
            w[rows] = w[rows].scatter_add(1, columns(self.idx[:, :k]), self.values[:, :k])
        return w

    def dense_bias(self) -> torch.Tensor | None:
        if self.bias_p is None:
            return None
        b = torch.empty_like(self.bias_p)
        b[self.perm] = self.bias_p
        return b

    # -- forward

    def _positions(self, x: torch.Tensor) -> int:
        return x.numel() // max(x.shape[-1], 1) if x.dim() else 1

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if channels != self.in_features:
            raise SemisparseError(f"expected {what} of size {self.in_features}, got input shape {tuple(x.shape)}")
        if x.dtype != self.values.dtype:
            raise SemisparseError(f"{type(self).__name__} holds {self.values.dtype} weights, got {x.dtype} input; "
                                  f"convert the layer or the input")
        if x.device != self.values.device:
            raise SemisparseError(f"{type(self).__name__} is on {self.values.device}, got input on {x.device}")
        if x.device.type != "cuda" and not interpreting():
            raise SemisparseError("the condensed Triton kernels run on CUDA tensors (or on CPU under "
                                  "TRITON_INTERPRET=1); got a CPU input")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0:
            raise SemisparseError(f"expected input (..., {self.in_features}), got a scalar")
        if x.requires_grad and torch.is_grad_enabled():  # inference kernels: autograd runs the dense weight
            if x.shape[-1] != self.in_features:
                raise SemisparseError(f"expected last dimension of size {self.in_features}, got {tuple(x.shape)}")
            return F.linear(x, self.dense_weight(), self.dense_bias())
        self._check(x, x.shape[-1], "last dimension")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        cfg = self.config or configs_for(x2.shape[0], self.fan_in, x.element_size())[0]
        if cfg.transpose_input and x2.shape[0] > 1:
            xt = x2.t().contiguous()  # (in, batch): a gather reads a contiguous run of the batch
            x3 = xt.t().unsqueeze(0)
        else:
            x3 = x2.unsqueeze(0)
        self._run(x3, y.unsqueeze(0), cfg)
        return y.view(*lead, self.out_features)

    def _run(self, x3: torch.Tensor, y3: torch.Tensor, cfg: KernelConfig) -> None:
        """``x3 (N, P, in)`` and ``y3 (N, P, out)`` any strides (views); writes ``y3``."""
        N, P, _ = x3.shape
        if N * P == 0:
            return
        if self.n_kept == 0:  # every neuron ablated: the output is the bias (or 0)
            fill = torch.zeros_like(y3[0, 0]) if self.bias_p is None else self.dense_bias()
            y3.copy_(fill.expand_as(y3))
            return
        launch(x3, self.values, self.idx, self.fan_in, self.bias_p, self.perm, self.n_kept, y3, cfg)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.fan_in}, "
                f"kept={self.n_kept}, config={self.config.name if self.config else 'auto'}")


def launch(x3: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, fan_in: int, bias_p: torch.Tensor | None,
           perm: torch.Tensor, n_kept: int, y3: torch.Tensor, cfg: KernelConfig) -> None:
    """Run the condensed kernel(s): ``y3[n, p, perm[r]] = values[r, :fan_in] . x3[n, p, idx[r, :fan_in]] +
    bias_p[r]`` (rows ``r >= n_kept`` are ablated: bias only). ``x3 (N, P, in)``, ``y3 (N, P, out)`` strided
    views; ``values`` / ``idx`` ``(R, KP)`` contiguous, ``KP >= fan_in``."""
    main, reduce = _kernels()
    N, P, _ = x3.shape
    K, KP = fan_in, values.shape[1]
    OUT = perm.numel()
    BO, BK, BB = cfg.block_out, cfg.block_k, cfg.block_batch
    n_oblk, n_pblk = _cdiv(OUT, BO), _cdiv(P, BB)
    KS = _cdiv(_cdiv(K, cfg.split), BK) * BK  # k per split, a multiple of BK
    split = _cdiv(K, KS)
    grid = (N * n_pblk * n_oblk, split)
    has_bias = bias_p is not None
    b = bias_p if has_bias else values
    u16 = idx.dtype == torch.int16
    if split == 1:
        main[grid](x3, values, idx, b, perm, y3, P, n_kept, OUT, K, KP, KS, n_pblk, n_oblk,
                   *x3.stride(), *y3.stride(), 0,
                   BO=BO, BK=BK, BB=BB, SPLIT=1, U16=u16, HAS_BIAS=has_bias, num_warps=cfg.num_warps)
        return
    M = N * P
    part = torch.empty(split, M, OUT, dtype=torch.float32, device=x3.device)
    main[grid](x3, values, idx, b, perm, part, P, n_kept, OUT, K, KP, KS, n_pblk, n_oblk,
               *x3.stride(), 0, 0, 0, M * OUT,
               BO=BO, BK=BK, BB=BB, SPLIT=split, U16=u16, HAS_BIAS=has_bias, num_warps=cfg.num_warps)
    BM = min(_pow2(M), 16)
    BR = 128 if BM <= 4 else 64
    reduce[(_cdiv(M, BM), _cdiv(OUT, BR))](part, b, perm, y3, M, P, OUT, M * OUT, *y3.stride(),
                                         SPLIT=split, HAS_BIAS=has_bias, BM=BM, BR=BR, num_warps=4)


class TritonCondensedConv(TritonCondensedLinear):
    """Condensed 1x1 ``Conv1d/2d/3d`` (stride 1, no padding, one group) as the Linear kernel over positions.

    ``x (N, C, *S)`` or unbatched ``(C, *S)``; a channels-last input gives a channels-last output, else
    contiguous (NCHW). Neither is copied: the kernel reads positions and channels through strides."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if weight.dim() < 3 or any(s != 1 for s in weight.shape[2:]):
            raise SemisparseError(f"TritonCondensedConv needs a 1x1 conv weight (out, in, 1, ...), got "
                                  f"{tuple(weight.shape)}")
        self.nd = weight.dim() - 2
        super().__init__(weight.reshape(weight.shape[0], -1), mask.reshape(weight.shape[0], -1), bias)

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, mask: torch.Tensor) -> TritonCondensedConv:
        why = unsupported_reason(conv)
        if why:
            raise SemisparseError(f"TritonCondensedConv cannot replace this {type(conv).__name__}: {why}")
        return cls(conv.weight.detach(), mask, conv.bias)

    def _positions(self, x: torch.Tensor) -> int:
        return math.prod(x.shape[2:]) * x.shape[0] if x.dim() == self.nd + 2 else math.prod(x.shape[1:])

    def configs(self, x: torch.Tensor) -> list[KernelConfig]:
        """As the Linear's, less ``transpose_input``: an NCHW input already is ``(C, H*W)`` per sample."""
        out = []
        for c in configs_for(self._positions(x), self.fan_in, x.element_size()):
            c = replace(c, transpose_input=False)
            if c not in out:
                out.append(c)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == self.nd + 2
        if not batched and x.dim() != self.nd + 1:
            raise SemisparseError(f"expected a {self.nd + 2}-D (batched) or {self.nd + 1}-D input to a "
                                  f"Conv{self.nd}d, got shape {tuple(x.shape)}")
        if not batched:
            x = x.unsqueeze(0)
        if x.requires_grad and torch.is_grad_enabled():  # inference kernels: autograd runs the dense weight
            if x.shape[1] != self.in_features:
                raise SemisparseError(f"expected input channels of size {self.in_features}, got {tuple(x.shape)}")
            w = self.dense_weight().view(self.out_features, self.in_features, *([1] * self.nd))
            y = (F.conv1d, F.conv2d, F.conv3d)[self.nd - 1](x, w, self.dense_bias())
            return y if batched else y.squeeze(0)
        self._check(x, x.shape[1], "input channels")
        N, spatial = x.shape[0], tuple(x.shape[2:])
        S = math.prod(spatial)
        x3 = x.movedim(1, -1).reshape(N, S, self.in_features)  # a view for NCHW and channels-last alike
        if x3.stride(2) == 1 and S > 1:  # channels-last in: channels-last out, (N*S, C) rows
            y = torch.empty(N, *spatial, self.out_features, dtype=x.dtype, device=x.device).movedim(-1, 1)
        else:
            y = torch.empty(N, self.out_features, *spatial, dtype=x.dtype, device=x.device)
        y3 = y.movedim(1, -1).view(N, S, self.out_features)  # a view: the kernel writes y
        cfg = self.config or configs_for(N * S, self.fan_in, x.element_size())[0]
        if N > 1 and x3.stride(0) == S * x3.stride(1) and y3.stride(0) == S * y3.stride(1):
            # samples follow each other (channels-last, or 1x1 spatial): one run of N*S positions
            x3, y3 = x3.reshape(1, N * S, self.in_features), y3.view(1, N * S, self.out_features)
        self._run(x3, y3, cfg)
        return y if batched else y.squeeze(0)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kernel_size=1, k={self.fan_in}, kept={self.n_kept}"


def unsupported_reason(module: nn.Module) -> str:
    """"" when :func:`build` can condense ``module``, else the reason it cannot."""
    if isinstance(module, nn.Linear):
        return ""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if any(k != 1 for k in module.kernel_size):
            return f"kernel size {tuple(module.kernel_size)} (only 1x1 convs run as a GEMM)"
        if any(s != 1 for s in module.stride):
            return f"stride {tuple(module.stride)} (only stride 1)"
        if module.groups != 1:
            return f"groups={module.groups} (only 1)"
        if not isinstance(module.padding, str) and any(p != 0 for p in module.padding):
            return f"padding {tuple(module.padding)} (only none)"  # 'same' / 'valid' pad nothing at 1x1
        return ""
    return f"{type(module).__name__} is not a Linear or a 1x1 conv"


def build(module: nn.Module, mask: torch.Tensor) -> TritonCondensedLinear | None:
    """The Triton condensed layer for ``module`` (``nn.Linear`` or a 1x1 conv) under bool ``mask`` of its
    weight's shape, on the module's device and dtype; ``None`` when :func:`unsupported_reason` gives a reason."""
    if unsupported_reason(module):
        return None
    if isinstance(module, nn.Linear):
        return TritonCondensedLinear.from_linear(module, mask)
    return TritonCondensedConv.from_conv(module, mask)


def candidates(layer: TritonCondensedLinear, x: torch.Tensor) -> list[KernelConfig]:
    """The kernel settings the planner should time for ``layer`` on input ``x`` (``layer.configs(x)``)."""
    return layer.configs(x)
