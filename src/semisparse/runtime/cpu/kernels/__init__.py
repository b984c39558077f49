"""The fast path: fp32 condensed kernels in C (``condensed.c``), compiled on first use, loaded with ctypes.

Why C through ctypes rather than a torch C++ extension or numba: it compiles in about a second with the
system C compiler (no torch headers, no ninja, no build isolation pulling a second torch), its call costs
a few microseconds, and with ``-fopenmp`` it binds at load time to the ``libgomp`` torch already loaded,
so these kernels and torch's intra-op pool are one pool: the kernels run as many threads as torch's pool
has, and no more than the CPUs the process may use at the call (:mod:`..cpus`). On x86-64 the source is
built once per instruction-set variant (:data:`VARIANTS`: generic, AVX2/FMA, AVX-512) and the fastest one
the CPU runs is loaded, chosen once per process from the CPU's flags (``SEMISPARSE_KERNEL_ISA`` forces one;
a variant the CPU cannot run is a one-line error). Libraries are cached per source/compiler/variant under
``$SEMISPARSE_CACHE`` (default ``~/.cache/semisparse/kernels``).

Where no C compiler is found (or ``SEMISPARSE_NO_KERNELS=1``) the same functions run as pure torch
reference code, one warning is issued, and the planner then keeps dense layers wherever that is slower.

Memory safety. The C entry points trust their arguments, so nothing reaches them unchecked: every call
checks the tensors it is handed (dtype, contiguity, sizes, storage), and every index the C code reads
comes from a :class:`Table`, a private copy whose range was measured when it was made. A tensor the
caller keeps can change between calls in ways torch does not record (an inference tensor has no version
counter; ``.data`` and NumPy views write past it), so a range measured on it once proves nothing later.
A bound call (:func:`gemv_binding`, :func:`conv2d_binding`) holds its float tensors' storage and refuses
to run (:class:`Stale`) once one of them was replaced or resized. The library itself is loaded only when
its size and sha256 match what was recorded when it was built (a sidecar file); otherwise it is rebuilt.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ....errors import SemisparseError
from ....indices import columns
from ..cpus import threads_now

_SRC = Path(__file__).with_name("condensed.c")
_ABI = 23
_lock = threading.Lock()
_seen = threading.local()  # per Python thread: the torch thread count last given to OpenMP
_lib: ctypes.CDLL | None = None
_path: Path | None = None  # the cached library file loaded
_variant = ""  # its instruction-set variant
_tried = False
_why_not = ""

#: Positions per register block of the SpMM kernel (8 AVX2 vectors).
BLOCK = 64


def _cache_dir() -> Path:
    root = os.environ.get("SEMISPARSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "semisparse")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _digest(path: Path) -> dict:
    """Size and sha256 of a file, as the sidecar records them."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _sidecar(lib_path: Path) -> Path:
    return lib_path.with_name(lib_path.name + ".sha256")


def _verified(lib_path: Path) -> bool:
    """The cached library exists and matches the size and digest recorded when it was built. A truncated
    library kills the process that maps it (SIGBUS inside ``dlopen``) and an altered one computes wrong
    results, so a library without a matching record is never loaded."""
    try:
        record = json.loads(_sidecar(lib_path).read_text())
        if not isinstance(record, dict) or lib_path.stat().st_size != record.get("size"):
            return False
        return _digest(lib_path) == record
    except (OSError, ValueError):
        return False


def _write_synced(path: Path, data: bytes | None = None, src: Path | None = None) -> None:
    """``data`` (or the file ``src``) at ``path``: written to a temporary file, fsynced, renamed over
    ``path`` (atomic), and the folder fsynced, so a crash leaves the old file or the whole new one."""
    if src is None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        src = Path(tmp)
    os.replace(src, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


#: Instruction-set variants of the library on x86-64, slowest first: the CPU flags each needs (as
#: /proc/cpuinfo names what CPUID reports) and its compiler flags. One library is built per variant used, and
#: the fastest the CPU runs is loaded (``SEMISPARSE_KERNEL_ISA`` forces one, for tests and benchmarks).
VARIANTS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "generic": ((), ["-march=x86-64"]),
    "avx2": (("avx2", "fma"), ["-march=haswell"]),
    "avx512": (("avx512f", "avx512dq", "avx512vl", "avx512bw", "avx2", "fma"), ["-march=skylake-avx512"]),
}
#: The vector width in bits each variant's kernels use (``ss_simd``).
VARIANT_BITS = {"generic": 0, "avx2": 256, "avx512": 512, "native": -1}


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def runnable_variants(flags: str | None = None) -> list[str]:
    """The variants this CPU runs, slowest first (``["native"]`` off x86-64: one build for the host)."""
    if not _x86():
        return ["native"]
    have = set((flags if flags is not None else _cpu_flags()).split())
    return [name for name, (needs, _) in VARIANTS.items() if all(f in have for f in needs)]


def chosen_variant(flags: str | None = None) -> str:
    """The variant to load: ``SEMISPARSE_KERNEL_ISA`` when set (a ``SemisparseError`` when it names no
    variant, or one this CPU cannot run), else the fastest this CPU runs."""
    runnable = runnable_variants(flags)
    forced = os.environ.get("SEMISPARSE_KERNEL_ISA", "").strip().lower()
    if not forced:
        return runnable[-1]
    names = list(VARIANTS) if _x86() else ["native"]
    if forced not in names:
        raise SemisparseError(f"SEMISPARSE_KERNEL_ISA must be one of {', '.join(names)}; got {forced!r}")
    if forced not in runnable:
        need = " ".join(VARIANTS[forced][0])
        raise SemisparseError(f"SEMISPARSE_KERNEL_ISA={forced}: this CPU cannot run it (it needs {need}; "
                              f"this CPU runs {', '.join(runnable)})")
    return forced


def _compile(cc: str, out: Path, variant: str = "native") -> Path:
    """Build the library into a fresh file next to ``out``; returns that file (fsynced, not yet renamed)."""
    base = [cc, "-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", str(_SRC), "-o"]
    errors = []
    archs = ([VARIANTS[variant][1] + ["-mtune=native"], VARIANTS[variant][1]] if variant in VARIANTS
             else [["-march=native"], []])
    for arch in archs:
        tmp = Path(tempfile.mkstemp(suffix=".so", dir=out.parent, prefix=".tmp-")[1])
        try:
            subprocess.run(base[:1] + arch + base[1:] + [str(tmp)], check=True, capture_output=True, timeout=120)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            return tmp
        except (subprocess.SubprocessError, OSError) as exc:
            errors.append(getattr(exc, "stderr", b"") or str(exc).encode())
            tmp.unlink(missing_ok=True)
    raise RuntimeError(errors[-1].decode(errors="replace").strip().splitlines()[-1:] or "compile failed")


def _build(cc: str, out: Path, variant: str = "native") -> ctypes.CDLL:
    """Compile, load the new file (this process never maps a file another process may still replace),
    then publish it: the library renamed over ``out``, then its size and digest in the sidecar."""
    tmp = _compile(cc, out, variant)
    try:
        record = _digest(tmp)
        lib = ctypes.CDLL(str(tmp))
        _write_synced(out, src=tmp)  # the mapping follows the file, whatever its name
        _write_synced(_sidecar(out), json.dumps(record).encode())
    finally:
        tmp.unlink(missing_ok=True)
    return lib


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float  # noqa: F841
    lib.ss_spmm.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i64]
    lib.ss_spmm.restype = None
    lib.ss_spmm_pairs.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64]
    lib.ss_spmm_pairs.restype = None
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


def _threads(lib: ctypes.CDLL) -> int:
    """The kernels' thread count in this Python thread: torch's intra-op count, no more than the CPUs the
    process may use now (:func:`..cpus.threads_now`); handed to the C side when it changed. Returns it."""
    n = threads_now()
    if getattr(_seen, "n", None) != n:
        lib.ss_sync_threads(n)
        _seen.n = n
    return n


def _load(variant: str) -> tuple[ctypes.CDLL, Path]:
    """The library of ``variant``: the cached file when it verifies, else built now. Raises on failure."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc/clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    flags = _cpu_flags() if variant == "native" else " ".join(VARIANTS[variant][1])
    key = hashlib.sha256(
        _SRC.read_bytes() + version.encode() + platform.machine().encode() + flags.encode()
    ).hexdigest()[:16]
    out = _cache_dir() / f"condensed-{variant}-{key}.so"
    if _verified(out):
        lib = ctypes.CDLL(str(out))
    else:  # missing, truncated, altered, or built before digests were recorded: build it again
        out.parent.mkdir(parents=True, exist_ok=True)
        lib = _build(cc, out, variant)
    _bind(lib)
    if lib.ss_abi_version() != _ABI:
        raise RuntimeError("stale kernel library")
    return lib, out


_variants: dict[str, ctypes.CDLL] = {}


def variant_library(variant: str) -> ctypes.CDLL:
    """The library of one variant, built if needed (tests and benchmarks compare them; each library is its own
    ctypes handle, so several load side by side). A ``SemisparseError`` for a variant this CPU cannot run."""
    if variant not in runnable_variants():
        raise SemisparseError(f"kernel variant {variant!r} does not run on this CPU (it runs "
                              f"{', '.join(runnable_variants())})")
    with _lock:
        if variant not in _variants:
            _variants[variant] = _load(variant)[0]
        return _variants[variant]


def library() -> ctypes.CDLL | None:
    """The compiled kernel library of the chosen variant (:func:`chosen_variant`), building it on first use;
    None (after one warning) where unavailable. A forced variant this CPU cannot run is a ``SemisparseError``."""
    global _lib, _path, _tried, _why_not, _variant
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if not os.environ.get("SEMISPARSE_NO_KERNELS"):
            variant = chosen_variant()  # raises, rather than running something else than what was asked
        try:
            if os.environ.get("SEMISPARSE_NO_KERNELS"):
                raise RuntimeError("disabled by SEMISPARSE_NO_KERNELS")
            _lib, _path = _load(variant)
            _variant = variant
        except Exception as exc:  # any failure means: run the torch reference path
            _why_not = str(exc)
            warnings.warn(
                f"semisparse: fast CPU kernels unavailable ({exc}); using the torch reference path "
                "(deploy keeps dense layers where that is slower)",
                RuntimeWarning,
                stacklevel=2,
            )
        _tried = True
        return _lib


def loaded_variant() -> str:
    """The instruction-set variant of the loaded library ("" without kernels)."""
    library()
    return _variant


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def available() -> bool:
    """True when the compiled kernels are loaded (or can be built now)."""
    return library() is not None


def unavailable_reason() -> str:
    library()
    return _why_not


def simd_width() -> int:
    """Vector width in bits of the loaded library's hot loops (512 AVX-512, 256 AVX2+FMA, 0 scalar)."""
    lib = library()
    return int(lib.ss_simd()) if lib is not None else 0


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

    __slots__ = ("_t", "lo", "hi", "unsigned16", "_ascending_within")

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
) -> None:
    """``Y[orow[r]*ldy + p*ldp] = bias[r] + sum_j W[r, j] * X[(p//PB)*panel + off[r, j] + p%PB]``.

    ``X`` flat fp32 (readable up to ``BLOCK`` elements past the last real position), ``W`` (rows, k) fp32,
    ``off`` (rows, k) int32 from :func:`offsets`, ``orow`` (rows,) int64 (both tensors or :class:`Table`),
    ``Y`` fp32 with row stride ``ldy`` and position stride ``ldp``; positions ``p < P``; ``PB`` a multiple of
    8, at most ``BLOCK``. All contiguous, on CPU. ``pairs=True`` (needs ``PB == 32``) runs two rows per pass.
    """
    off, orow = table(off), table(orow)
    rows, k = _check_rows(W, off, bias, orow)
    if PB not in (8, 16, 24, 32, 40, 48, 56, 64) or (pairs and PB != 32):
        raise _bad(f"PB must be a multiple of 8 from 8 to 64 (32 with pairs=True), got {PB}")
    _check_reads(X, off, P, PB, panel, exact=False)
    _check_writes(Y, orow, P, ldy, ldp)
    lib = library()
    if lib is None:
        return spmm_reference(X, W, off._t, bias, orow._t, Y, P, ldy, PB, panel, ldp)
    by_blocks = split_by_blocks(P, PB, rows, _threads(lib), prefer_blocks)
    if pairs:
        lib.ss_spmm_pairs(X.data_ptr(), W.data_ptr(), off.data_ptr(), _ptr(bias), orow.data_ptr(), Y.data_ptr(),
                          rows, k, P, ldy, ldp, panel, by_blocks)
        return
    lib.ss_spmm(X.data_ptr(), W.data_ptr(), off.data_ptr(), _ptr(bias), orow.data_ptr(), Y.data_ptr(),
                rows, k, P, ldy, ldp, PB, panel, by_blocks)


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
    lib = library()
    if lib is None:
        return spmm_reference(X, W, off._t, bias, orow._t, Y, P, ldy, PB, panel, ldp)
    by_blocks = split_by_blocks(P, PB, rows, _threads(lib))
    rc = lib.ss_spmm_tiled(X.data_ptr(), W.data_ptr(), off.data_ptr(), seg.data_ptr(), seg.shape[1] - 1,
                           _ptr(bias), orow.data_ptr(), Y.data_ptr(), rows, k, P, ldy, ldp, PB, panel, by_blocks)
    if rc != 0:
        raise MemoryError("semisparse: could not allocate the tiled kernel's scratch rows")


def _check_segments(seg: Table, k: int) -> None:
    """Each row's tile bounds ascend within ``[0, k]`` (checked once per table: a table never changes)."""
    if seg._ascending_within == k:
        return
    t = seg._t
    if t.numel() and not (bool((t[:, 0] >= 0).all()) and bool((t[:, -1] <= k).all())
                          and bool((t[:, 1:] >= t[:, :-1]).all())):
        raise _bad(f"seg must ascend within [0, {k}] along each row")
    seg._ascending_within = k


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
    lib = library()
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
    lib = library()
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
    lib = library()
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
    lib = library()
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
    lib = library()
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


_I64 = ctypes.c_int64
_VP = ctypes.c_void_p


class _ConvPlan(ctypes.Structure):
    _fields_ = ([(n, _I64) for n in ("C", "H0", "W0", "sh", "sw", "H", "W", "pt", "pl", "Hp", "Wp", "cs", "stH",
                                     "stW", "Hq", "Wq")]
                + [(n, _VP) for n in ("Wt", "off", "seg", "bias", "orow", "abl", "abl_vals")]
                + [(n, _I64) for n in ("rows", "k", "nt", "P", "PB", "kind", "by_blocks", "Cout", "Ho", "Wo",
                                       "nabl")])

_CONV_GEOMETRY = ("C", "H0", "W0", "sh", "sw", "H", "W", "pt", "pl", "Hp", "Wp", "cs", "stH", "stW", "Hq", "Wq",
                  "P", "Ho", "Wo")


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
    if kind not in (0, 1, 2) or PB not in ((8, 16, 24, 32, 40, 48, 56, 64), (32,), (32, 64))[kind]:
        raise _bad(f"kernel kind {kind} with PB {PB} is not a kernel setting")
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


def conv2d_binding(geometry: dict, W: torch.Tensor, off: torch.Tensor | Table, seg: torch.Tensor | Table | None,  # noqa: N803
                   bias: torch.Tensor | None, orow: torch.Tensor | Table, ablated: torch.Tensor | Table,
                   ablated_vals: torch.Tensor, PB: int, kind: int, out_channels: int):
    """One C call for a whole batch-1 2-D convolution (pad, product, crop, ablated rows): ``run(x, out)``.

    ``geometry``: ``C, H0, W0, sh, sw, H, W, pt, pl, Hp, Wp, cs, stH, stW, Hq, Wq, P, Ho, Wo`` (input channels
    and size, the 1x1 subsampling steps, the padded size, the stride phases and their planes, positions,
    output size). ``kind`` 0: one row per pass
    (``PB`` 8-64), 1: row pairs (``PB`` 32), 2: channel tiles (``seg``, ``PB`` 32 or 64). None without kernels.
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
    lib = library()
    if lib is None:
        return None
    rows, k = W.shape
    g = geometry
    plan = _ConvPlan(
        *(g[n] for n in ("C", "H0", "W0", "sh", "sw", "H", "W", "pt", "pl", "Hp", "Wp", "cs", "stH", "stW", "Hq",
                         "Wq")),
        W.data_ptr(), off.data_ptr(), _ptr(seg), _ptr(bias), orow.data_ptr(), ablated.data_ptr(),
        ablated_vals.data_ptr(), rows, k, 1 if seg is None else seg.shape[1] - 1, g["P"], PB, kind,
        0, out_channels, g["Ho"], g["Wo"], len(ablated))
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
