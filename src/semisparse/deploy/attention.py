"""``nn.MultiheadAttention`` with its packed QKV projection (and out-projection) condensed.

PyTorch's MHA reads ``in_proj_weight`` directly inside ``F.multi_head_attention_forward``, so a sparse
projection needs its own module: the same call signature and results, the projections as
:class:`~semisparse.deploy.condensed.SparseLinear` layers, the attention itself through
``F.scaled_dot_product_attention``. Only what deploy meets in vision models is supported (packed
``in_proj_weight``, no ``bias_k``/``bias_v``/``add_zero_attn``); other MHAs stay dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def supports(mha: nn.MultiheadAttention) -> str:
    """"" when :class:`SparseMultiheadAttention` can replace ``mha``, else the reason it cannot."""
    if not mha._qkv_same_embed_dim:
        return "separate q/k/v projection weights (kdim/vdim != embed_dim)"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "bias_k/bias_v or add_zero_attn"
    return ""


class SparseMultiheadAttention(nn.Module):
    """Drop-in for an eval-mode ``nn.MultiheadAttention`` whose ``in_proj`` / ``out_proj`` are any modules
    mapping ``(..., E) -> (..., 3E)`` and ``(..., E) -> (..., E)``."""

    def __init__(self, mha: nn.MultiheadAttention, in_proj: nn.Module, out_proj: nn.Module) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj = in_proj
        self.out_proj = out_proj

    def _project(self, x: torch.Tensor, part: int) -> torch.Tensor:
        e = self.embed_dim
        return self.in_proj(x)[..., part * e:(part + 1) * e]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, tq, e = query.shape
        if query is key and key is value:
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:
            q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        h, d = self.num_heads, self.head_dim
        q = q.reshape(b, tq, h, d).transpose(1, 2)
        k = k.reshape(b, -1, h, d).transpose(1, 2)
        v = v.reshape(b, -1, h, d).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, b, h, tq, k.shape[2], q.dtype)
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / d**0.5
            if is_causal and mask is None:
                mask = torch.full((tq, k.shape[2]), float("-inf"), dtype=q.dtype).triu(1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(b, tq, e))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights


def _merge_masks(attn_mask, key_padding_mask, b, h, tq, tk, dtype):
    """MHA's masks (bool: True = not allowed; or additive float) -> one additive float mask or None."""
    out = None
    if attn_mask is not None:
        am = attn_mask
        if am.dtype == torch.bool:
            am = torch.zeros(am.shape, dtype=dtype).masked_fill(am, float("-inf"))
        am = am.view(b, h, tq, tk) if am.dim() == 3 else am.view(1, 1, tq, tk)
        out = am.to(dtype)
    if key_padding_mask is not None:
        kp = key_padding_mask
        if kp.dtype == torch.bool:
            kp = torch.zeros(kp.shape, dtype=dtype).masked_fill(kp, float("-inf"))
        kp = kp.view(b, 1, 1, tk).to(dtype)
        out = kp if out is None else out + kp
    return out
