"""Which modules deploy may replace: those whose forward is provably torch's own.

A deployed layer computes what ``nn.Linear`` / ``nn.ConvNd`` / ``nn.MultiheadAttention`` compute. A subclass
that redefines its forward (timm's ``StdConv2d`` standardises its weight, ``Conv2dSame`` pads by the input's
size, a cosine Linear normalises its weight) computes something else, so it stays the module it is (its mask
multiplied into its weight) and the report says why. Forward hooks and pre-hooks are carried over to the
replacement, where torch's ``__call__`` runs them as it ran them on the original.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["why_not_plain", "carry_hooks"]

_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)

#: What the base classes' forward reads from the class: a subclass redefining any of them computes otherwise.
_USED = frozenset({"forward", "_conv_forward", "__call__", "_call_impl", "_wrapped_call_impl", "__getattr__",
                   "__getattribute__", "weight", "bias", "in_proj_weight", "in_proj_bias", "q_proj_weight",
                   "k_proj_weight", "v_proj_weight", "merge_masks", "padding", "stride", "dilation", "groups",
                   "padding_mode", "_reversed_padding_repeated_twice"})

#: The forward hook tables torch's ``__call__`` reads (carried to a replacement as they are).
_FORWARD_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def why_not_plain(mod: nn.Module) -> str:
    """"" when deploy may replace ``mod`` by its condensed form, else why it stays as it is (one line)."""
    base = next((b for b in _BASES if isinstance(mod, b)), None)
    cls = type(mod)
    if base is None:
        return f"{cls.__name__} is not a Linear, Conv or MultiheadAttention"
    for klass in cls.__mro__:
        if klass is base:
            break
        over = sorted(_USED & set(vars(klass)))
        if over:
            return f"{cls.__name__} redefines {over[0]} of nn.{base.__name__}"
    own = sorted({"forward", "_conv_forward"} & set(vars(mod)))
    if own:
        return f"{own[0]} replaced on the module itself"
    if mod._backward_hooks or mod._backward_pre_hooks:
        return "has backward hooks"
    if parametrize.is_parametrized(mod):
        return "carries another parametrization"
    if isinstance(mod, nn.modules.conv._ConvNd) and mod.padding_mode != "zeros":
        return f"padding_mode={mod.padding_mode!r} (the kernels pad with zeros)"
    return ""


def carry_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` the forward hooks and pre-hooks of ``old`` (same order, same kinds); returns ``new``."""
    for table in _FORWARD_HOOKS:
        src = getattr(old, table, None)
        if src:
            getattr(new, table).update(OrderedDict(src))
    return new
