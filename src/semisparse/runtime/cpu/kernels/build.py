"""Building and loading the library of ``condensed.c``: compiled on first use with the system C compiler,
once per instruction-set variant on x86-64 (:data:`VARIANTS`: generic, AVX2/FMA, AVX-512), the fastest one
the CPU runs loaded (``SEMISPARSE_KERNEL_ISA`` forces one; a variant the CPU cannot run is a one-line error; for
tests, :data:`EMULATED` runs the AVX-512 code on AVX2 CPUs).
Libraries are cached per source/compiler/variant under ``$SEMISPARSE_CACHE`` (default
``~/.cache/semisparse/kernels``) and loaded only when their size and sha256 match what was recorded when they
were built (a sidecar file); otherwise rebuilt. No compiler (or ``SEMISPARSE_NO_KERNELS=1``): :func:`library`
is None, with one warning. Also the kernels' thread count, handed to OpenMP per Python thread."""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from ....errors import SemisparseError
from ..cpus import threads_now
from .binding import _bind

_SRC = Path(__file__).with_name("condensed.c")
_ABI = 27
_lock = threading.Lock()
_seen = threading.local()  # per Python thread: the torch thread count last given to OpenMP
_lib: ctypes.CDLL | None = None
_path: Path | None = None  # the cached library file loaded
_variant = ""  # its instruction-set variant
_tried = False
_why_not = ""


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
#: Variants for tests only, never loaded unless asked for: the AVX-512 kernels built for an AVX2 CPU, SIMDe
#: (package ``simde-py``, in the ``test`` extra) standing in for the AVX-512 intrinsics, so that the 16-wide code
#: runs and is checked against the reference on machines without AVX-512 (``SEMISPARSE_KERNEL_ISA=avx512-emulated``).
EMULATED: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "avx512-emulated": (("avx2", "fma"), ["-march=haswell", "-DSS_EMULATE_AVX512", "-Wno-psabi"]),
}
#: The vector width in bits each variant's kernels use (``ss_simd``).
VARIANT_BITS = {"generic": 0, "avx2": 256, "avx512": 512, "avx512-emulated": 512, "native": -1}


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def runnable_variants(flags: str | None = None) -> list[str]:
    """The variants this CPU runs, slowest first (``["native"]`` off x86-64: one build for the host)."""
    if not _x86():
        return ["native"]
    have = set((flags if flags is not None else _cpu_flags()).split())
    return [name for name, (needs, _) in VARIANTS.items() if all(f in have for f in needs)]


def emulated_variants(flags: str | None = None) -> list[str]:
    """The test-only variants (:data:`EMULATED`) this CPU runs and this environment can build (SIMDe present)."""
    if not _x86() or _simde_include() is None:
        return []
    have = set((flags if flags is not None else _cpu_flags()).split())
    return [name for name, (needs, _) in EMULATED.items() if all(f in have for f in needs)]


def _simde_include() -> str | None:
    try:
        import simde_py
    except ImportError:
        return None
    return simde_py.get_include()


def _arch_flags(variant: str) -> list[str]:
    """The compiler flags that select ``variant``'s instruction set (SIMDe's headers for an emulated one)."""
    if variant in EMULATED:
        return EMULATED[variant][1] + ["-I" + (_simde_include() or "")]
    return VARIANTS[variant][1] if variant in VARIANTS else ["-march=native"]


def _extra_flags() -> list[str]:
    """``SEMISPARSE_KERNEL_CFLAGS``: compiler flags added to every build (tests build with a sanitizer)."""
    return os.environ.get("SEMISPARSE_KERNEL_CFLAGS", "").split()


def chosen_variant(flags: str | None = None) -> str:
    """The variant to load: ``SEMISPARSE_KERNEL_ISA`` when set (a ``SemisparseError`` when it names no
    variant, or one this CPU cannot run), else the fastest this CPU runs."""
    runnable = runnable_variants(flags)
    forced = os.environ.get("SEMISPARSE_KERNEL_ISA", "").strip().lower()
    if not forced:
        return runnable[-1]
    names = [*VARIANTS, *EMULATED] if _x86() else ["native"]
    if forced not in names:
        raise SemisparseError(f"SEMISPARSE_KERNEL_ISA must be one of {', '.join(names)}; got {forced!r}")
    if forced in EMULATED:
        if forced not in emulated_variants(flags):
            raise SemisparseError(f"SEMISPARSE_KERNEL_ISA={forced}: it needs an AVX2 CPU and the simde-py package "
                                  "(pip install simde-py)")
        return forced
    if forced not in runnable:
        need = " ".join(VARIANTS[forced][0])
        raise SemisparseError(f"SEMISPARSE_KERNEL_ISA={forced}: this CPU cannot run it (it needs {need}; "
                              f"this CPU runs {', '.join(runnable)})")
    return forced


def _compile(cc: str, out: Path, variant: str = "native") -> Path:
    """Build the library into a fresh file next to ``out``; returns that file (fsynced, not yet renamed)."""
    base = [cc, "-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", str(_SRC), "-o"]
    errors = []
    arch = _arch_flags(variant) + _extra_flags()
    archs = [arch + ["-mtune=native"], arch] if variant != "native" else [arch, _extra_flags()]
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
    flags = " ".join([_cpu_flags() if variant == "native" else " ".join(_arch_flags(variant)), *_extra_flags()])
    if variant in EMULATED:  # the headers are part of the source
        flags += " simde-py " + importlib.metadata.version("simde-py")
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
    if variant not in runnable_variants() + emulated_variants():
        raise SemisparseError(f"kernel variant {variant!r} does not run on this CPU (it runs "
                              f"{', '.join(runnable_variants() + emulated_variants())})")
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
