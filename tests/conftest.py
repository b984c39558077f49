"""Test-session set-up: Triton kernels run on CPU under Triton's interpreter where there is no GPU.

``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported (its standard library functions are
built for one mode at import), so it is set here, before any test module imports torchvision or semisparse.
On a machine with CUDA it is left alone and the same tests run the compiled kernels on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
