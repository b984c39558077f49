"""PyTorch's own transformer layers with condensed projections.

``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` have a fused fast path (eval mode, no grad) that
reads ``self_attn.in_proj_weight``, ``linear1.weight``, ... directly and hands them to one native kernel;
with condensed layers in their place those tensors do not exist. A deployed copy of such a module becomes
the subclass below: the same module (same children, same state) whose forward is PyTorch's own layer-by-layer
path, which calls the condensed layers. What the fast path does differently is kept: a ``TransformerEncoder``
that would have packed a padded batch into a nested tensor returns zeros at the padded positions, as the
fast path does, and a nested input is run padded and returned nested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from ..attention import renest, unnest

_SUPPORTED_DEVICES = ("cpu", "cuda", "xpu")


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that always runs its layer-by-layer path (its submodules may be
    condensed layers, which the fused fast path cannot read)."""

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if src.is_nested:  # the fast path's ragged batches: run padded, hand back nested
            if src_mask is not None or src_key_padding_mask is not None:
                raise AssertionError("a NestedTensor input takes neither src_mask nor src_key_padding_mask")
            padded, pad = unnest(src)
            return renest(self.forward(padded, src_key_padding_mask=pad), pad)
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                                 target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` over deployed layers: the padded batch the fast path would have packed
    into a nested tensor is run padded (with its key padding mask) and its padded positions are zeroed,
    which is what the fast path returns for them."""

    def _would_nest(self, src: torch.Tensor, mask: torch.Tensor | None, pad: torch.Tensor | None) -> bool:
        """PyTorch's test for packing ``src`` into a nested tensor (``nn.TransformerEncoder.forward``)."""
        first = self.layers[0]
        if (not torch.backends.mha.get_fastpath_enabled() or not getattr(self, "use_nested_tensor", False)
                or first.training or src.dim() != 3 or pad is None or src.is_nested or mask is not None
                or torch.is_autocast_enabled()):
            return False
        check = getattr(self, "mask_check", True)
        if check and (torch.compiler.is_compiling()
                      or not torch._nested_tensor_from_mask_left_aligned(src, pad.logical_not())):
            return False
        if torch.overrides.has_torch_function((src,)) or src.device.type not in _SUPPORTED_DEVICES:
            return False
        tensors = [src, *first.parameters()]
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(mask), other_name="mask",
                                                 target_type=src.dtype)
        mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
        nest = self._would_nest(src, mask, src_key_padding_mask)
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, self.layers[0].self_attn.batch_first))
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if nest:
            out = out.masked_fill((src_key_padding_mask != 0).unsqueeze(-1), 0.0)
        if self.norm is not None:
            out = self.norm(out)
        return out


def _runs_deployed_layers(layer: nn.TransformerEncoderLayer) -> bool:
    """True when a submodule the fused fast path reads was replaced by a deployed layer."""
    return not (type(layer.self_attn) is nn.MultiheadAttention and isinstance(layer.linear1, nn.Linear)
                and isinstance(layer.linear2, nn.Linear))


def deploy_transformers(model: nn.Module) -> nn.Module:
    """Give every ``nn.TransformerEncoderLayer`` (exactly that class) that holds deployed layers, and every
    ``nn.TransformerEncoder`` over such layers, the forward above; in place, returns ``model``."""
    swapped = set()
    for mod in model.modules():
        if type(mod) is nn.TransformerEncoderLayer and _runs_deployed_layers(mod):
            mod.__class__ = TransformerEncoderLayer
            swapped.add(id(mod))
    for mod in model.modules():
        if type(mod) is nn.TransformerEncoder and any(id(layer) in swapped for layer in mod.layers):
            mod.__class__ = TransformerEncoder
    return model
