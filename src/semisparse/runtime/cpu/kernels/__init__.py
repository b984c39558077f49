"""The fast path: fp32 condensed kernels in C (``condensed.c``), compiled on first use, loaded with ctypes.

Why C through ctypes rather than a torch C++ extension or numba: it compiles in about a second with the
system C compiler (no torch headers, no ninja, no build isolation pulling a second torch), its call costs
a few microseconds, and with ``-fopenmp`` it binds at load time to the ``libgomp`` torch already loaded,
so these kernels and torch's intra-op pool are one pool: the kernels run as many threads as torch's pool
has, and no more than the CPUs the process may use at the call (:mod:`..cpus`). On x86-64 the source is
built once per instruction-set variant (:data:`VARIANTS`: generic, AVX2/FMA, AVX-512) and the fastest one
the CPU runs is loaded, chosen once per process from the CPU's flags (``SEMISPARSE_KERNEL_ISA`` forces one;
a variant the CPU cannot run is a one-line error). For tests, :data:`EMULATED` builds the AVX-512 code for AVX2
CPUs with SIMDe emulating its intrinsics, so it is checked on machines that cannot run it natively. Libraries
are cached per source/compiler/variant under ``$SEMISPARSE_CACHE`` (default ``~/.cache/semisparse/kernels``).

Where no C compiler is found (or ``SEMISPARSE_NO_KERNELS=1``) the same functions run as pure torch
reference code, one warning is issued, and the planner then keeps dense layers wherever that is slower.

The package: :mod:`.build` compiles, caches, verifies and loads the library; :mod:`.binding` holds the
C signatures and the argument checks; :mod:`.wrappers` the functions below, one per entry point.

Memory safety. The C entry points trust their arguments, so nothing reaches them unchecked: every call
checks the tensors it is handed (dtype, contiguity, sizes, storage), and every index the C code reads
comes from a :class:`Table`, a private copy whose range was measured when it was made. A tensor the
caller keeps can change between calls in ways torch does not record (an inference tensor has no version
counter; ``.data`` and NumPy views write past it), so a range measured on it once proves nothing later.
A bound call (:func:`gemv_binding`, :func:`conv2d_binding`) holds its float tensors' storage and refuses
to run (:class:`Stale`) once one of them was replaced or resized. The library itself is loaded only when
its size and sha256 match what was recorded when it was built (a sidecar file); otherwise it is rebuilt.
"""

from .binding import BLOCK, Stale, Table, extent, reads_input_as_is, table
from .build import (
    EMULATED,
    VARIANT_BITS,
    VARIANTS,
    available,
    chosen_variant,
    emulated_variants,
    library,
    loaded_variant,
    runnable_variants,
    simd_width,
    unavailable_reason,
    variant_library,
)
from .wrappers import (
    GEMV_VARIANTS,
    conv2d_binding,
    fill_rows,
    gemv,
    gemv_binding,
    gemv_reference,
    maxpool2d,
    offsets,
    pack_panels,
    rows4_by_offset,
    rows4_values,
    scratch,
    split_by_blocks,
    spmm,
    spmm_reference,
    spmm_tiled,
    tile,
    transpose,
)

__all__ = [
    "BLOCK", "EMULATED", "GEMV_VARIANTS", "VARIANTS", "VARIANT_BITS", "Stale", "Table", "available", "chosen_variant",
    "conv2d_binding", "emulated_variants", "extent", "fill_rows", "gemv", "gemv_binding", "gemv_reference", "library",
    "loaded_variant", "maxpool2d", "offsets", "pack_panels", "reads_input_as_is", "rows4_by_offset", "rows4_values",
    "runnable_variants", "scratch", "simd_width", "spmm", "spmm_reference", "spmm_tiled", "split_by_blocks", "table",
    "tile", "transpose", "unavailable_reason", "variant_library",
]
