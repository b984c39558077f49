"""Switching the compiled kernels off, or to another instruction-set variant, inside a test (deploy,
kernel-safety and kernel-variant tests)."""

import contextlib

from semisparse.runtime.cpu import kernels


@contextlib.contextmanager
def kernels_of(lib):
    """Every kernel call, and every layer deployed inside, runs the library ``lib`` (one variant's build);
    ``None``: no library, as with ``SEMISPARSE_NO_KERNELS=1`` (every kernel function runs its torch reference)."""
    saved = kernels.build.library
    kernels.build.library = lambda: lib
    try:
        yield
    finally:
        kernels.build.library = saved


def kernels_off():
    """As with ``SEMISPARSE_NO_KERNELS=1``: every kernel function runs its pure-torch reference path."""
    return kernels_of(None)
