"""The one module swap and the one walk over the masked layers, shared by the CPU and CUDA builds.

A module may be registered under several names (a block shared by two parents, a layer also kept in a
plain list): a swap puts the new module at every one of them (:func:`replace_everywhere`), so no name
keeps running the old module. :func:`masked_layers` says which modules own the masks a build reads: an
``nn.MultiheadAttention`` owns its projections' weights (the packed QKV and ``out_proj``), any other
module its ``weight``; each build then decides what each becomes.
"""

from __future__ import annotations

from torch import nn

__all__ = ["MHA_WEIGHTS", "masked_layers", "registered_names", "replace_everywhere"]

#: The weights of an ``nn.MultiheadAttention`` a mask may sit on, relative to the attention module.
MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight")


def registered_names(root: nn.Module) -> dict[int, list[str]]:
    """``{id(module): every name it is registered under}`` (a module shared by two parents has two)."""
    names: dict[int, list[str]] = {}
    for name, mod in root.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def replace_everywhere(root: nn.Module, names: list[str], new: nn.Module) -> nn.Module:
    """Put ``new`` at each of ``names`` (all the names one module is registered under); returns the
    (possibly new) root."""
    for name in names:
        if not name:
            return new
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, new)
    return root


def masked_layers(model: nn.Module, masks: dict) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
    """``(name, module, its keys in masks)`` of every module of ``model`` owning a key of ``masks``, once each
    (at its first name), in module order: an MHA owns its :data:`MHA_WEIGHTS`, any other module its
    ``weight``."""
    out: list[tuple[str, nn.Module, tuple[str, ...]]] = []
    taken: set[str] = set()
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.MultiheadAttention):
            keys = tuple(prefix + p for p in MHA_WEIGHTS if prefix + p in masks)
            taken.update(prefix + p for p in MHA_WEIGHTS)
        else:
            key = prefix + "weight"
            keys = (key,) if key in masks and key not in taken else ()
        if keys:
            out.append((name, mod, keys))
    return out
