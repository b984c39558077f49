"""The forms a deployed layer can run in: dense, or cuSPARSELt through a GEMM lowering.

Everything is a GEMM ``x2d (T, K) -> (T, out)`` (:class:`DenseGemm`, :class:`SparseGemm`) wrapped by how the
layer's input becomes ``x2d``:

* :class:`LinearForm` - ``(..., in)`` flattened to ``(T, in)`` (Linear, MHA's packed QKV and out-projection);
* :class:`Conv1x1` - a 1x1 conv on a channels-last activation *is* a GEMM: ``(N, C, H, W)`` in channels-last
  memory is ``(N*H*W, C)`` row-major already, and the ``(T, out)`` result viewed back is channels-last too;
* :class:`ConvTaps` - a k x k conv as one GEMM per kernel tap on the shifted window, accumulated;
* :class:`ConvIm2col` - a k x k conv as one GEMM on the ``(T, taps*C)`` patch matrix, taps major and
  channels innermost: the column order of the layout view, so the 2:4 groups stay whole;
* :class:`DenseConv` - torch's own convolution (the reference every conv form is timed against).

Sizes: the token count T is padded to a multiple of 16 for cuSPARSELt and sliced off again; an output size
that is not a multiple of 16 (ViT's 1000-class head) gets zero weight rows, sliced off as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backend import ALIGN
from .eligibility import pad_rows, round_up


class DenseGemm(nn.Module):
    """``x2d @ W.T + b`` through torch (cuBLAS): the dense twin of :class:`SparseGemm`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())

    def forward(self, x2d: torch.Tensor) -> torch.Tensor:
        return F.linear(x2d, self.weight, self.bias)


class SparseGemm(nn.Module):
    """``x2d @ W.T + b`` with ``W (out, K)`` 2:4 along K, compressed once, run by the back-end.

    ``alg_id`` is searched on the first call (deploy's planning run, outside any graph capture) and kept;
    it is saved with the plan. ``backend`` is a plain attribute (not state): cuSPARSELt or its emulation.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend) -> None:
        super().__init__()
        out = weight.shape[0]
        extra = round_up(out) - out
        w = weight.detach()
        if extra:
            w = F.pad(w, (0, 0, 0, extra))
            bias = None if bias is None else F.pad(bias.detach(), (0, extra))
        self.out_features = out
        self.in_features = weight.shape[1]
        self.backend = backend
        self.register_buffer("packed", backend.compress(w.contiguous()))
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        self.alg_id: int | None = None

    def forward(self, x2d: torch.Tensor) -> torch.Tensor:
        t = x2d.shape[0]
        xt = pad_rows(x2d.contiguous(), ALIGN).t()  # (K, T'): the column-major dense operand
        if self.alg_id is None:
            self.alg_id = self.backend.search(self.packed, xt, self.bias)
        y = self.backend.mm(self.packed, xt, self.bias, self.alg_id)
        if y.shape[0] != t or y.shape[1] != self.out_features:
            y = y[:t, : self.out_features]
        return y


class LinearForm(nn.Module):
    """``(..., in) -> (..., out)`` through a GEMM."""

    def __init__(self, gemm: nn.Module) -> None:
        super().__init__()
        self.gemm = gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.gemm(x.reshape(-1, x.shape[-1]))
        return y.reshape(*lead, y.shape[-1])


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


class _ConvGeometry(nn.Module):
    def __init__(self, kernel: tuple[int, int], conv: dict) -> None:
        super().__init__()
        self.kernel = tuple(kernel)
        self.stride = _pair(conv.get("stride", 1))
        self.padding = _pair(conv.get("padding", 0))
        self.dilation = _pair(conv.get("dilation", 1))

    def _windows(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int, int]]:
        """The ``(N, Ho, Wo, C)`` input window of every kernel tap (tap-major order) and ``(N, Ho, Wo)``."""
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        ho, wo = conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)
        xh = x.permute(0, 2, 3, 1)  # NHWC view (no copy for a channels-last input)
        if ph or pw:
            xh = F.pad(xh, (0, 0, pw, pw, ph, ph))
        wins = [xh[:, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw, :]
                for i in range(kh) for j in range(kw)]
        return wins, (n, ho, wo)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _nchw(y2d: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """``(N*H*W, out)`` -> ``(N, out, H, W)`` in channels-last memory (a view when ``y2d`` is contiguous)."""
    return y2d.reshape(n, h, w, y2d.shape[-1]).permute(0, 3, 1, 2)


class Conv1x1(_ConvGeometry):
    """A 1x1 conv (no padding) as one GEMM on the channels-last activation; stride by subsampling."""

    def __init__(self, gemm: nn.Module, conv: dict) -> None:
        super().__init__((1, 1), conv)
        self.gemm = gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        if sh > 1 or sw > 1:
            x = x[:, :, ::sh, ::sw]
        n, c, h, w = x.shape
        return _nchw(self.gemm(x.permute(0, 2, 3, 1).reshape(-1, c)), n, h, w)


class ConvTaps(_ConvGeometry):
    """k x k conv as ``sum over taps (i, j) of window_ij (T, C) @ W[:, :, i, j].T``; bias in the first GEMM."""

    def __init__(self, gemms: list[nn.Module], kernel: tuple[int, int], conv: dict) -> None:
        super().__init__(kernel, conv)
        self.gemms = nn.ModuleList(gemms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wins, (n, ho, wo) = self._windows(x)
        acc = None
        for gemm, win in zip(self.gemms, wins):
            y = gemm(win.reshape(-1, win.shape[-1]))
            acc = y if acc is None else acc + y
        return _nchw(acc, n, ho, wo)


class ConvIm2col(_ConvGeometry):
    """k x k conv as one GEMM on the ``(T, taps*C)`` patch matrix (taps major, channels innermost)."""

    def __init__(self, gemm: nn.Module, kernel: tuple[int, int], conv: dict) -> None:
        super().__init__(kernel, conv)
        self.gemm = gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wins, (n, ho, wo) = self._windows(x)
        cols = torch.stack(wins, dim=3)  # (N, Ho, Wo, taps, C)
        return _nchw(self.gemm(cols.reshape(n * ho * wo, -1)), n, ho, wo)


class DenseConv(nn.Module):
    """torch's conv with the masked weight (channels-last when the model is)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, conv: dict) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.conv = dict(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(x, self.weight, self.bias, c.get("stride", 1), c.get("padding", 0), c.get("dilation", 1),
                        c.get("groups", 1))


def tap_weights(weight: torch.Tensor) -> list[torch.Tensor]:
    """``(out, C, kh, kw)`` -> ``[W[:, :, i, j]]`` in tap-major order, each ``(out, C)`` contiguous."""
    return [weight[:, :, i, j].contiguous() for i in range(weight.shape[2]) for j in range(weight.shape[3])]


def im2col_weight(weight: torch.Tensor) -> torch.Tensor:
    """``(out, C, kh, kw)`` -> ``(out, kh*kw*C)``, channels innermost (the layout view)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()
