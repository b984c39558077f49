"""The C entry points' ctypes signatures, and the checks every call passes before it reaches one.

The C entry points trust their arguments, so nothing reaches them unchecked: every call checks the tensors
it is handed (dtype, contiguity, sizes, storage), and every index the C code reads comes from a
:class:`Table`, a private copy whose range was measured when it was made; a bound call holds its float
tensors' storage and refuses to run (:class:`Stale`) once one of them was replaced or resized.
"""

from __future__ import annotations

import ctypes

import torch

#: Positions per register block of the SpMM kernel (8 AVX2 vectors).
BLOCK = 64


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float  # noqa: F841
    lib.ss_spmm.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i64]
    lib.ss_spmm.restype = None
    lib.ss_spmm_pairs.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64]
    lib.ss_spmm_pairs.restype = None
    lib.ss_spmm_rows4.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64]
    lib.ss_spmm_rows4.restype = None
    lib.ss_spmm_tiled.argtypes = [p, p, p, p, i64, p, p, p, i64, i64, i64, i64, i64, i64, i64, i64]
    lib.ss_spmm_tiled.restype = ctypes.c_int
    lib.ss_gemv_run.argtypes = [p, p, p]
    lib.ss_gemv_run.restype = None
    lib.ss_fill_rows.argtypes = [p, p, p, i64, i64, i64, i64]
    lib.ss_fill_rows.restype = None
    lib.ss_conv2d_run.argtypes = [p, p, p]
    lib.ss_conv2d_run.restype = ctypes.c_int
    lib.ss_maxpool2d.argtypes = [p, p] + [i64] * 11
    lib.ss_maxpool2d.restype = ctypes.c_int
    lib.ss_transpose.argtypes = [p, p, i64, i64, i64, i64]
    lib.ss_transpose.restype = None
    lib.ss_pack_panels.argtypes = [p, p, i64, i64, i64]
    lib.ss_pack_panels.restype = None
    lib.ss_sync_threads.argtypes = [ctypes.c_int]
    lib.ss_sync_threads.restype = None
    lib.ss_abi_version.restype = ctypes.c_int
    lib.ss_simd.restype = ctypes.c_int
    lib.ss_max_threads.restype = ctypes.c_int


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# Argument checks. The C entry points take raw pointers and trust every size and index they are given, so
# each Python function below proves, before it calls one, that every element the C code reads or writes
# lies inside the tensors passed (dtype, device, contiguity, sizes, storage, and the range of every index
# table); anything else is a ValueError. Index ranges come from Tables (measured once on a private copy) or,
# for a plain tensor, are measured at the call on a copy made at the call.


class Stale(ValueError):
    """A bound kernel call whose tensors were replaced, resized or changed in place since it was bound."""


class Table:
    """An integer index table the kernels own: a private contiguous copy, its range measured when made.

    Nothing outside this module writes it, so the range checked against a call's buffers is the range of
    what the C code reads, whatever happens to the tensor it was copied from. ``unsigned16``: int16 entries
    are uint16 bit patterns (condensed column indices).
    """

    __slots__ = ("_t", "lo", "hi", "unsigned16", "_ascending_within", "_fours", "_steps")

    def __init__(self, t: torch.Tensor, unsigned16: bool = False) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int16, torch.int32, torch.int64):
            raise _bad(f"an index table must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device.type != "cpu":
            raise _bad(f"an index table must be on the CPU, got {t.device}")
        self._t = t.detach().clone(memory_format=torch.contiguous_format)
        self.unsigned16 = bool(unsigned16 and t.dtype == torch.int16)
        if self._t.numel() == 0:
            self.lo, self.hi = 0, -1
        else:
            v = self._t.to(torch.int64) & 0xFFFF if self.unsigned16 else self._t
            lo, hi = torch.aminmax(v)
            self.lo, self.hi = int(lo), int(hi)
        self._ascending_within = None  # the k for which segment rows were checked (see _check_segments)
        self._fours = None  # whether rows come in blocks of 4 equal rows (see rows_in_fours), once asked
        self._steps = None  # whether a 1-D table counts up by one within each block of 4 (adjacent_in_fours)

    def rows_in_fours(self) -> bool:
        """Whether the rows come in blocks of 4 equal rows: the rows4 kernels read each block's first row only.
        Measured once (nothing writes the copy)."""
        if self._fours is None:
            t = self._t
            blocks = t.view(-1, 4, t.shape[1]) if t.dim() == 2 and len(t) and len(t) % 4 == 0 else None
            self._fours = blocks is not None and bool((blocks == blocks[:, :1]).all())
        return self._fours

    def adjacent_in_fours(self) -> bool:
        """Whether a 1-D table (output rows) comes in blocks of 4 consecutive values: the rows4 kernels then
        store a block's 4 outputs of one position as one vector. Measured once."""
        if self._steps is None:
            t = self._t
            ok = t.dim() == 1 and len(t) % 4 == 0
            self._steps = ok and bool((t.view(-1, 4) - t.view(-1, 4)[:, :1] == torch.arange(4)).all())
        return self._steps

    @property
    def dtype(self) -> torch.dtype:
        return self._t.dtype

    @property
    def shape(self) -> torch.Size:
        return self._t.shape

    def numel(self) -> int:
        return self._t.numel()

    def dim(self) -> int:
        return self._t.dim()

    def __len__(self) -> int:
        return len(self._t)

    def data_ptr(self) -> int:
        return self._t.data_ptr()

    def tensor(self) -> torch.Tensor:
        """A copy of the table (the table itself is never handed out)."""
        return self._t.clone()


def table(t: torch.Tensor | Table, unsigned16: bool = False) -> Table:
    """``t`` as a :class:`Table` (itself if it is one)."""
    return t if isinstance(t, Table) else Table(t, unsigned16)


def _bad(what: str) -> ValueError:
    return ValueError(f"semisparse kernels: {what}")


def _fits(t: torch.Tensor) -> bool:
    """``t``'s storage holds every element its shape addresses (a storage resized under a tensor does not)."""
    need = (t.storage_offset() + t.numel()) * t.element_size()
    return t.numel() == 0 or (t.data_ptr() != 0 and t.untyped_storage().nbytes() >= need)


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple | None = None) -> None:
    """``t`` is a contiguous CPU tensor of ``dtype`` (and ``shape``): what the C code may read as a flat array."""
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        got = f"{t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise _bad(f"{name} must be a contiguous CPU {dtype} tensor, got {got}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise _bad(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not _fits(t):
        raise _bad(f"{name}'s storage is smaller than its shape (resized or freed under it)")


def _check_table(t: Table, name: str, dtypes: tuple, shape: tuple | None = None) -> None:
    if t.dtype not in dtypes:
        raise _bad(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise _bad(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def extent(t: torch.Tensor | Table, unsigned16: bool = False) -> tuple[int, int]:
    """``(min, max)`` of an integer index tensor (int16 read as unsigned with ``unsigned16``); ``(0, -1)`` when
    empty. Measured now for a tensor (nothing about a tensor's contents is remembered between calls)."""
    t = table(t, unsigned16)
    return t.lo, t.hi


def _check_rows(W: torch.Tensor, off: Table, bias: torch.Tensor | None, orow: Table,  # noqa: N803
                off_dtype: torch.dtype = torch.int32, w_dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """The stored rows of a condensed layer: ``W (rows, k)`` fp32, ``off``/``idx`` ``(rows, k)``, ``bias (rows,)``
    or None, ``orow (rows,)`` int64. Returns ``(rows, k)``."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise _bad("W must be a (rows, k) tensor")
    rows, k = W.shape
    _check(W, "W", w_dtype)
    allowed = (torch.int16, torch.int32) if off_dtype == torch.int16 else (off_dtype,)
    _check_table(off, "index table", allowed, (rows, k))
    _check_table(orow, "orow", (torch.int64,), (rows,))
    if bias is not None:
        _check(bias, "bias", torch.float32, (rows,))
    return rows, k


def _check_writes(Y: torch.Tensor, rows: Table, P: int, ldy: int, ldp: int) -> None:  # noqa: N803
    """``Y[rows[i]*ldy + p*ldp]`` for ``p < P`` lies inside ``Y``."""
    _check(Y, "Y", torch.float32)
    if P < 0 or ldy < 0 or ldp < 0:
        raise _bad(f"P, ldy and ldp must be >= 0, got {P}, {ldy}, {ldp}")
    lo, hi = rows.lo, rows.hi
    if P and rows.numel() and (lo < 0 or hi * ldy + (P - 1) * ldp >= Y.numel()):
        raise _bad(f"output rows {lo}..{hi} x {P} positions (ldy {ldy}, ldp {ldp}) do not fit Y of {Y.numel()}")


def _check_reads(X: torch.Tensor, off: Table, P: int, PB: int, panel: int, exact: bool) -> None:  # noqa: N803
    """Block ``b`` of ``PB`` positions reads ``X[b*panel + off + i]``: for ``i < BLOCK`` (full-width vector
    loads), or with ``exact`` (masked loads) only for the block's positions. All of it inside ``X``."""
    _check(X, "X", torch.float32)
    if panel < 0:
        raise _bad(f"panel must be >= 0, got {panel}")
    if not P or not off.numel():
        return
    lo, hi = off.lo, off.hi
    nb = -(-P // PB)
    if exact:
        need = (nb - 1) * panel + hi + (P - (nb - 1) * PB)
        if nb > 1:
            need = max(need, (nb - 2) * panel + hi + PB)
    else:
        need = (nb - 1) * panel + hi + BLOCK
    if lo < 0 or need > X.numel():
        raise _bad(f"offsets {lo}..{hi} over {P} positions read up to element {need} of X, which has {X.numel()}")


def _check_segments(seg: Table, k: int) -> None:
    """Each row's tile bounds ascend within ``[0, k]`` (checked once per table: a table never changes)."""
    if seg._ascending_within == k:
        return
    t = seg._t
    if t.numel() and not (bool((t[:, 0] >= 0).all()) and bool((t[:, -1] <= k).all())
                          and bool((t[:, 1:] >= t[:, :-1]).all())):
        raise _bad(f"seg must ascend within [0, {k}] along each row")
    seg._ascending_within = k


def _check_vectors(x: torch.Tensor, y: torch.Tensor, nx: int, ny: int) -> None:
    """``x`` and ``y`` contiguous CPU fp32 with at least ``nx`` / ``ny`` elements."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == torch.float32
            and y.dtype == torch.float32 and x.is_cpu and y.is_cpu and x.is_contiguous() and y.is_contiguous()
            and x.numel() >= nx and y.numel() >= ny):
        _check(x, "x", torch.float32)
        _check(y, "y", torch.float32)
        raise _bad(f"x needs {nx} and y {ny} elements, got {x.numel()} and {y.numel()}")
    _check(x, "x", torch.float32)
    _check(y, "y", torch.float32)


class _Held:
    """A float tensor a bound call reads through a raw pointer: its storage is kept alive, and ``ok()`` says
    the tensor still has that storage, at that address, at least that large (``.data =``, ``set_`` or a
    storage ``resize_`` since binding make it False: the call then refuses instead of reading freed memory)."""

    __slots__ = ("t", "storage", "ptr", "sptr", "need")

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.storage, self.ptr = t, t.untyped_storage(), t.data_ptr()
        self.sptr = self.storage.data_ptr()
        self.need = self.ptr - self.sptr + t.numel() * t.element_size()  # bytes of the storage read

    def ok(self) -> bool:
        st = self.storage
        return self.t.data_ptr() == self.ptr and st.data_ptr() == self.sptr and st.nbytes() >= self.need


def _stamp(t: torch.Tensor) -> tuple[int, int]:
    """What a source tensor looked like when bound: address and version (-1 for inference tensors)."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return t.data_ptr(), -1


class _GemvPlan(ctypes.Structure):
    _fields_ = [("W", ctypes.c_void_p), ("idx", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("orow", ctypes.c_void_p), ("rows", ctypes.c_int64), ("k", ctypes.c_int64),
                ("wide", ctypes.c_int32), ("hw", ctypes.c_int32), ("bf16", ctypes.c_int32), ("unused", ctypes.c_int32)]
_VP = ctypes.c_void_p
_I64 = ctypes.c_int64


class _ConvPlan(ctypes.Structure):
    _fields_ = ([(n, _I64) for n in ("C", "H0", "W0", "sh", "sw", "H", "W", "pt", "pl", "Hp", "Wp", "cs", "stH",
                                     "stW", "Hq", "Wq")]
                + [(n, _VP) for n in ("Wt", "off", "seg", "bias", "orow", "abl", "abl_vals")]
                + [(n, _I64) for n in ("rows", "k", "nt", "P", "PB", "kind", "by_blocks", "Cout", "Ho", "Wo",
                                       "nabl", "alias")])

_CONV_GEOMETRY = ("C", "H0", "W0", "sh", "sw", "H", "W", "pt", "pl", "Hp", "Wp", "cs", "stH", "stW", "Hq", "Wq",
                  "P", "Ho", "Wo")


def reads_input_as_is(g: dict, off: Table, kind: int, PB: int) -> bool:  # noqa: N803
    """Whether ``ss_conv2d_run`` may read ``x`` itself instead of its padded copy: the copy would equal ``x``
    (stride 1, no subsampling, no padding, channels ``cs == H0 * W0`` apart) and the product reads nothing past
    ``x``'s ``C * cs`` floats. The rows4 kernels (kind 3) read tiles of 24 positions, the last one in whole
    vectors of 8; the others read whole blocks of ``PB``, so only when ``P`` is a multiple of ``PB``."""
    P = g["P"]
    if off.numel() == 0 or P == 0:
        return False
    same = (g["stH"] == g["stW"] == g["sh"] == g["sw"] == 1 and g["pt"] == g["pl"] == 0 and g["H"] == g["Hq"] == g["H0"]
            and g["W"] == g["Wq"] == g["W0"] and g["cs"] == g["H0"] * g["W0"])
    if kind == 3:
        last = (P - 1) // 24 * 24
        end = off.hi + last + -(-(P - last) // 8) * 8  # one past the last float the product reads
    elif P % PB == 0:
        end = off.hi + P
    else:
        return False
    return same and off.lo >= 0 and end <= g["C"] * g["cs"]


def _check_conv_plan(g: dict, W: torch.Tensor, off: Table, seg: Table | None,  # noqa: N803
                     bias: torch.Tensor | None, orow: Table, ablated: Table,
                     ablated_vals: torch.Tensor, PB: int, kind: int, out_channels: int) -> None:
    """What ``ss_conv2d_run`` touches lies inside its buffers: the input copy reads rows ``< H0`` and columns
    ``< W0`` of each of ``C`` channels, the padded copy fits ``cs`` floats per channel, the product reads the
    copy (``C * cs`` plus ``BLOCK`` floats) and writes ``P <= Hq*Wq`` positions of ``out_channels`` planes."""
    rows, k = _check_rows(W, off, bias, orow)
    _check_table(ablated, "ablated", (torch.int64,))
    if ablated.dim() != 1:
        raise _bad("ablated must be a 1-D tensor")
    _check(ablated_vals, "ablated_vals", torch.float32, tuple(ablated.shape))
    v = {n: g.get(n) for n in _CONV_GEOMETRY}
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in v.values()):
        raise _bad(f"conv geometry must be ints: {v}")
    if min(v["C"], v["H0"], v["W0"], v["sh"], v["sw"], v["stH"], v["stW"], v["Hq"], v["Wq"], out_channels) < 1 or (
            min(v["pt"], v["pl"], v["P"], v["Ho"], v["Wo"], v["Hp"], v["Wp"]) < 0):  # fmt: skip
        raise _bad(f"conv geometry out of range: {v}")
    plane = v["Hq"] * v["Wq"]
    if (v["H"] != -(-v["H0"] // v["sh"]) or v["W"] != -(-v["W0"] // v["sw"]) or v["pl"] + v["W"] > v["Wq"] * v["stW"]
            or v["cs"] < v["stH"] * v["stW"] * plane or v["P"] > plane or v["Ho"] > v["Hq"] or v["Wo"] > v["Wq"]):
        raise _bad(f"inconsistent conv geometry: {v}")
    if kind not in (0, 1, 2, 3) or PB not in ((8, 16, 24, 32, 40, 48, 56, 64), (32,), (32, 64), (24,))[kind]:
        raise _bad(f"kernel kind {kind} with PB {PB} is not a kernel setting")
    if kind == 3 and not off.rows_in_fours():  # the kernel reads each block's offsets from its first row
        raise _bad("rows4 needs rows in blocks of 4 with the same offsets")
    if kind == 2:
        if seg is None or seg.dim() != 2 or seg.shape[0] != rows or seg.shape[1] < 2:
            raise _bad("channel tiles need seg (rows, tiles + 1)")
        _check_table(seg, "seg", (torch.int32,))
        _check_segments(seg, k)
    lo, hi = off.lo, off.hi
    nb = -(-v["P"] // PB)
    if v["P"] and rows and k and (lo < 0 or (nb - 1) * PB + hi + BLOCK > v["C"] * v["cs"] + BLOCK):
        raise _bad(f"offsets {lo}..{hi} read past the padded input of {v['C']} x {v['cs']}")
    for name, t in (("orow", orow), ("ablated", ablated)):
        if t.numel() and (t.lo < 0 or t.hi >= out_channels):
            raise _bad(f"{name} {t.lo}..{t.hi} outside the {out_channels} output channels")
