"""Test-run settings shared by every test module.

Hypothesis draws its examples from a seed derived from each test (``derandomize``), keeps no database of
past failures between runs, has no per-example deadline, and does not fail a test for generating data
slowly (``too_slow``): on a loaded machine all three turn a passing test into a failure by chance, and a
``make test`` must pass or fail the same way every time. ``HYPOTHESIS_PROFILE=explore`` draws new random
examples on each run instead (for hunting counterexamples, not for CI).

Triton kernels run on CPU tensors only under Triton's interpreter, which must be switched on before triton
is first imported (its own jitted library functions, tl.sum among them, are built at import). Without a
CUDA device nothing else could run a Triton kernel, so the interpreter costs nothing; with one, the kernel
tests run compiled on the GPU instead.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
