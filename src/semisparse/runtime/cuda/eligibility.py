"""Which layers run cuSPARSELt on CUDA, and the padding that makes their sizes fit.

A layer is decided by its *mask*, not its declared pattern: any mask with at most 2 kept weights in every
group of 4 along the GEMM's reduction axis (2:4 itself, 1:4, 2:8 when every half holds 2 or fewer, a
constant fan-in mask that happens to fit) runs the same 2:4 path. The reduction axis is the layout view's
K (:mod:`semisparse.layout`): ``in_features`` for a Linear, input channels innermost at each kernel tap for
a conv (channels-last implicit GEMM order), so one check covers the 1x1, per-tap and im2col lowerings.

Every layer that stays dense gets a reason for ``ss.report``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .backend import ALIGN, SPARSE_DTYPES


def is_24(mask_view: torch.Tensor) -> bool:
    """True when the ``(rows, K)`` bool mask keeps at most 2 of every 4 consecutive entries along K."""
    rows, k = mask_view.shape
    if k % 4:
        return False
    return bool((mask_view.reshape(rows, k // 4, 4).sum(-1) <= 2).all())


def round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def pad_rows(x2d: torch.Tensor, to: int = ALIGN) -> torch.Tensor:
    """``(T, K)`` -> ``(round_up(T), K)`` with zero rows appended (cuSPARSELt's dense operand)."""
    extra = -x2d.shape[0] % to
    return F.pad(x2d, (0, 0, 0, extra)) if extra else x2d


@dataclass
class LayerSpec:
    """One masked weight as deploy found it: what the candidate forms are built from.

    ``weight`` is the masked dense weight (zeros where the mask is False) in the deploy dtype and device,
    in the layer's own shape (``(out, in)`` or ``(out, in, kh, kw)``); ``mask`` has the same shape.
    """

    key: str
    kind: str  # "Linear" | "MultiheadAttention" | "Conv2d" | ...
    weight: torch.Tensor
    mask: torch.Tensor
    bias: torch.Tensor | None
    pattern: str
    conv: dict = field(default_factory=dict)  # stride, padding, dilation, groups of a conv
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def density(self) -> float:
        return float(self.mask.float().mean())

    def mask_view(self) -> torch.Tensor:
        """``(out, K)`` with input channels innermost at each tap (the layout module's conv view)."""
        m = self.mask
        if m.dim() == 2:
            return m
        return m.reshape(m.shape[0], m.shape[1], -1).transpose(1, 2).reshape(m.shape[0], -1)


def sparse_reason(spec: LayerSpec, dtype: torch.dtype | None = None) -> str:
    """"" when ``spec`` can run cuSPARSELt in ``dtype`` (default: its weight's), else why it stays dense."""
    dtype = spec.weight.dtype if dtype is None else dtype
    if spec.kind not in ("Linear", "MultiheadAttention", "Conv2d"):
        return f"{spec.kind}: only Linear, MHA projections and Conv2d run 2:4 on CUDA"
    if spec.kind == "Conv2d":
        if spec.conv.get("groups", 1) != 1:
            return "grouped conv: no 2:4 GEMM lowering"
        if isinstance(spec.conv.get("padding"), str):
            return f"padding={spec.conv['padding']!r}: only numeric padding is lowered"
    if not is_24(spec.mask_view()):  # before the dtype: a fan-in layer's reason is its mask, in any dtype
        if ":" in spec.pattern:
            return f"{spec.pattern} mask is not 2:4 (more than 2 kept in a group of 4): dense"
        what = "constant fan-in" if spec.pattern.startswith("fan-in") else spec.pattern
        return f"{what} mask is not 2:4: no cuSPARSELt form (dense on CUDA unless it runs condensed)"
    if dtype not in SPARSE_DTYPES:
        return (f"{str(dtype).removeprefix('torch.')}: 2:4 tensor cores need 16-bit types "
                "(deploy with dtype=torch.bfloat16 or torch.float16)")
    cin = spec.shape[1]
    if cin % ALIGN:
        what = "input features" if spec.weight.dim() == 2 else "input channels"
        return f"{cin} {what}: cuSPARSELt needs a multiple of {ALIGN}"
    return ""


def out_padding_note(out: int) -> str:
    """How an output size that is not a multiple of 16 is handled (the report's note), or ""."""
    if out % ALIGN == 0:
        return ""
    return f"out {out} padded to {round_up(out)} with zero rows (output sliced)"


def mask_digest(mask: torch.Tensor) -> str:
    """A short digest of a bool mask (shape and kept positions): a saved plan is only used for its masks."""
    h = hashlib.sha256(str(tuple(mask.shape)).encode())
    h.update(mask.detach().cpu().to(torch.bool).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
