"""Max pooling for deployed models: torch's CPU kernel is slow on NCHW at small batches (about 4 ms for
ResNet's 64x112x112 stem output at batch 1 on 2 threads, more than a tenth of a 90%-sparse ResNet-50's
forward); :func:`kernels.maxpool2d` does the same pooling in a fraction of that. The planner times both
on the model's real input and keeps the faster."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def is_supported(pool: nn.Module) -> bool:
    """A plain ``nn.MaxPool2d`` without indices and with dilation 1 (what the kernel computes)."""
    return type(pool) is nn.MaxPool2d and not pool.return_indices and _pair(pool.dilation) == (1, 1)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, same state) whose fp32 forward may run semisparse's kernel;
    ``use_kernel`` is the planner's choice. Anything the kernel does not cover goes to torch."""

    use_kernel: bool = True

    @classmethod
    def from_module(cls, pool: nn.MaxPool2d) -> MaxPool2d:
        new = cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)
        new.train(pool.training)
        return new

    def _out(self, size: int, k: int, s: int, p: int) -> int:
        """torch's output size: floor (or ceil) mode, a last window must start inside the input or its
        left padding."""
        out = (size + 2 * p - k + ((s - 1) if self.ceil_mode else 0)) // s + 1
        if self.ceil_mode and (out - 1) * s >= size + p:
            out -= 1
        return out

    def forward(self, x: Tensor) -> Tensor:
        # (under torch.jit.trace / torch.export: torch's pooling, which a graph can hold; a ctypes call cannot)
        if self.use_kernel and x.dim() in (3, 4) and x.dtype == torch.float32 and x.is_contiguous() and (
                not x.requires_grad and x.device.type == "cpu" and not torch.jit.is_tracing()
                and not torch.compiler.is_exporting()):  # fmt: skip
            k, s, p = _pair(self.kernel_size), _pair(self.stride), _pair(self.padding)
            H, W = x.shape[-2:]
            if min(s) > 0 and 2 * p[0] <= k[0] and 2 * p[1] <= k[1] and H + 2 * p[0] >= k[0] and W + 2 * p[1] >= k[1]:
                out_hw = (self._out(H, k[0], s[0], p[0]), self._out(W, k[1], s[1], p[1]))
                y = kernels.maxpool2d(x, k, s, p, out_hw)
                if y is not None:
                    return y
        return super().forward(x)  # torch's pooling, and its errors for arguments it rejects

    def __prepare_scriptable__(self) -> nn.MaxPool2d:
        """``torch.jit.script`` compiles torch's own pooling (the kernel is a ctypes call)."""
        plain = nn.MaxPool2d(self.kernel_size, self.stride, self.padding, self.dilation, self.return_indices,
                             self.ceil_mode)
        return plain.train(self.training)
