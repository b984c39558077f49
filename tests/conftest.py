"""Test-session set-up shared by every test module."""

from __future__ import annotations

import os

import torch

# Triton kernels (semisparse.deploy.triton_condensed) run on CPU tensors only under Triton's interpreter,
# which must be switched on before triton is first imported (its own jitted library functions, tl.sum
# among them, are built at import). Without a CUDA device nothing else could run a Triton kernel, so the
# interpreter costs nothing; with one, the kernel tests run compiled on the GPU instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
