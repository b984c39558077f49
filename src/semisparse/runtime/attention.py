"""``nn.MultiheadAttention`` with its projections condensed.

PyTorch's MHA reads ``in_proj_weight`` (or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ from
``embed_dim``) directly inside ``F.multi_head_attention_forward``, so a sparse projection needs its own
module. :class:`SparseMultiheadAttention` takes the same arguments and follows the same steps as PyTorch's
own (non-fused) path, checks and errors included: the projections are
condensed layers made by the wing that deploys it (the CPU's ``SparseLinear``; or plain Linears where a
projection has no mask),
the attention itself runs through the same torch ops. PyTorch's fused fast path computes the same result.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SemisparseError


def unsupported_reason(mha: nn.MultiheadAttention) -> str:
    """"" when :class:`SparseMultiheadAttention` can replace ``mha``, else the reason it cannot."""
    if not isinstance(mha.embed_dim, int) or mha.embed_dim % mha.num_heads:
        return "embed_dim is not a multiple of num_heads"
    return ""


#: ``condense(key, weight, mask, bias, pattern) -> nn.Module``: a masked projection's condensed layer.
Condense = Callable[[str, torch.Tensor, torch.Tensor, "torch.Tensor | None", str], nn.Module]


def _projection(weight: torch.Tensor, bias: torch.Tensor | None, key: str, masks: dict, patterns: dict,
                condense: Condense) -> nn.Module:
    """A condensed projection where ``key`` has a mask, else a plain Linear with the same weight."""
    weight = weight.detach()
    if key in masks:
        return condense(key, weight, masks[key], bias, patterns[key])
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias.detach())
    lin.requires_grad_(False)
    return lin


class SparseMultiheadAttention(nn.Module):
    """Drop-in for an ``nn.MultiheadAttention`` whose projections are any modules: ``in_proj``
    ``(..., E) -> (..., 3E)`` (packed form), or ``q_proj``, ``k_proj``, ``v_proj`` (``kdim``/``vdim`` form),
    and ``out_proj`` ``(..., E) -> (..., E)``."""

    def __init__(self, mha: nn.MultiheadAttention, out_proj: nn.Module, in_proj: nn.Module | None = None,
                 q_proj: nn.Module | None = None, k_proj: nn.Module | None = None,
                 v_proj: nn.Module | None = None) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self.add_zero_attn = mha.add_zero_attn
        self._qkv_same_embed_dim = in_proj is not None
        self.in_proj, self.q_proj, self.k_proj, self.v_proj = in_proj, q_proj, k_proj, v_proj
        self.out_proj = out_proj
        self.bias_k = None if mha.bias_k is None else nn.Parameter(mha.bias_k.detach().clone(), requires_grad=False)
        self.bias_v = None if mha.bias_v is None else nn.Parameter(mha.bias_v.detach().clone(), requires_grad=False)
        self.train(mha.training)

    def __prepare_scriptable__(self):
        raise SemisparseError("torch.jit.script cannot compile a deployed multi-head attention (its projections "
                              "run ctypes kernels); torch.jit.trace and torch.export record torch's ops for it")

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, prefix: str, masks: dict, patterns: dict, condense: Condense
                    ) -> SparseMultiheadAttention:
        """Condense the masked projections of ``mha`` with ``condense``; mask keys are ``prefix +
        "in_proj_weight"`` etc."""
        bias = mha.in_proj_bias
        out_key = prefix + "out_proj.weight"
        out_proj = _projection(mha.out_proj.weight, mha.out_proj.bias, out_key, masks, patterns, condense)
        if mha._qkv_same_embed_dim:
            in_proj = _projection(mha.in_proj_weight, bias, prefix + "in_proj_weight", masks, patterns, condense)
            return cls(mha, out_proj, in_proj=in_proj)
        e = mha.embed_dim
        parts = [_projection(getattr(mha, f"{p}_proj_weight"), None if bias is None else bias[i * e:(i + 1) * e],
                             f"{prefix}{p}_proj_weight", masks, patterns, condense) for i, p in enumerate("qkv")]
        return cls(mha, out_proj, q_proj=parts[0], k_proj=parts[1], v_proj=parts[2])

    # The weights nn.MultiheadAttention holds, for code that reads them (masked, dense, as the projections'):
    @property
    def in_proj_weight(self) -> torch.Tensor | None:
        return None if self.in_proj is None else self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        if self.in_proj is not None:
            return self.in_proj.bias
        parts = [p.bias for p in (self.q_proj, self.k_proj, self.v_proj)]
        return None if any(b is None for b in parts) else torch.cat(parts)

    @property
    def q_proj_weight(self) -> torch.Tensor | None:
        return None if self.q_proj is None else self.q_proj.weight

    @property
    def k_proj_weight(self) -> torch.Tensor | None:
        return None if self.k_proj is None else self.k_proj.weight

    @property
    def v_proj_weight(self) -> torch.Tensor | None:
        return None if self.v_proj is None else self.v_proj.weight

    def _in_projection(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.in_proj is None:
            return self.q_proj(q), self.k_proj(k), self.v_proj(v)
        e = self.embed_dim
        if k is v:
            if q is k:  # self-attention: one packed product
                return self.in_proj(q).split(e, dim=-1)
            return (self.in_proj(q)[..., :e], *self.in_proj(k)[..., e:].split(e, dim=-1))
        return self.in_proj(q)[..., :e], self.in_proj(k)[..., e:2 * e], self.in_proj(v)[..., 2 * e:]

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
        if query.is_nested or key.is_nested or value.is_nested:
            return _nested_self_attention(self, query, key, value, key_padding_mask, attn_mask, need_weights,
                                          average_attn_weights)
        h = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, h)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:  # (N, L, E) -> (L, N, E), keeping which inputs are the same tensor
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (t.transpose(1, 0) for t in (query, key))
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        if not is_batched:
            if query is key and key is value:  # still one packed projection
                query = key = value = query.unsqueeze(1)
            elif key is value:
                query, key = query.unsqueeze(1), key.unsqueeze(1)
                value = key
            else:
                query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention's own causal masking
        elif key_padding_mask is not None:
            is_causal = False
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        if self.in_proj is None and key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        if self.in_proj is not None and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        q, k, v = self._in_projection(query, key, value)
        src_len = key.shape[0]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * h, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(bsz * h, tgt_len, src_len)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        d = self.head_dim
        q = q.reshape(tgt_len, bsz * h, d).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * h, d).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * h, d).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, torch.zeros((bsz * h, 1, d), dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros((bsz * h, 1, d), dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                                     f"{key_padding_mask.shape}")
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, h, -1, -1).reshape(bsz * h, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(d))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            weights = weights.view(bsz, h, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(bsz, h, -1, src_len)
            out = F.scaled_dot_product_attention(q.view(bsz, h, tgt_len, d), k.view(bsz, h, src_len, d),
                                                 v.view(bsz, h, src_len, d), attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
            weights = None
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(1, 0)
        return out, weights


def _nested_self_attention(mha: SparseMultiheadAttention, query, key, value, key_padding_mask, attn_mask,
                           need_weights, average_attn_weights):
    """PyTorch's fast path takes a nested (ragged) batch for self-attention without masks: run the padded
    batch with a key padding mask and return a nested output, as it does."""
    if not (query is key is value) or key_padding_mask is not None or attn_mask is not None or (
            not mha.batch_first) or mha.training:  # fmt: skip
        raise AssertionError("MultiheadAttention does not support NestedTensor outside of its fast path "
                             "(self-attention, batch_first, eval mode, no masks)")
    padded, pad = unnest(query)
    out, weights = mha(padded, padded, padded, key_padding_mask=pad, need_weights=need_weights,
                       average_attn_weights=average_attn_weights)
    return renest(out, pad), weights


def unnest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A nested ``(N, ragged L, E)`` batch -> zero-padded ``(N, L, E)`` and the bool padding mask ``(N, L)``."""
    lengths = [t.shape[0] for t in x.unbind()]
    padded = x.to_padded_tensor(0.0)
    pad = torch.arange(padded.shape[1], device=padded.device)[None, :] >= torch.tensor(lengths)[:, None]
    return padded, pad


def renest(y: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """The rows of ``y (N, L, E)`` that ``pad`` does not mark, as a nested tensor."""
    lengths = (~pad).sum(1).tolist()
    return torch.nested.nested_tensor([y[i, :n] for i, n in enumerate(lengths)])
