"""Switching the compiled kernels off inside a test, shared by the deploy and kernel-safety tests."""

import contextlib

from semisparse.runtime.cpu import kernels


@contextlib.contextmanager
def kernels_off():
    """As with ``SEMISPARSE_NO_KERNELS=1``: every kernel function runs its pure-torch reference path."""
    saved = kernels.build.library
    kernels.build.library = lambda: None
    try:
        yield
    finally:
        kernels.build.library = saved
