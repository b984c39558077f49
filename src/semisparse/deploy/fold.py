"""Fold eval-mode BatchNorm into the convolution before it (deploy-time, on the deployed copy).

An eval BatchNorm is a per-channel affine map, so ``bn(conv(x))`` equals a conv with rescaled output
channels and a shifted bias: the condensed kernel then does the BN for free, and the BN pass over the
activation is gone. Scaling whole output channels keeps masked weights zero, so masks stay as they are.
"""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

__all__ = ["fold_batchnorm"]

log = logging.getLogger(__name__)

_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


def fold_batchnorm(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
    """Fold every ``Conv{1,2,3}d -> BatchNorm{1,2,3}d`` pair of ``model`` in place; returns the BN names.

    Pairs are found on a ``torch.fx`` trace (analysis only: the model keeps its classes and forward); a
    folded BN becomes ``nn.Identity`` at its name, so the forward that still calls it is unchanged. Only
    a BN fed by nothing but the conv, whose conv output has no other user and both modules called once,
    is folded (anything else would change what the other users see). Untraceable model: nothing folded.
    Convs without a mask are folded as well (``masks`` are not changed: see the module docstring).
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # any failure: data-dependent control flow, unsupported ops, ...
        log.debug("semisparse: BatchNorm folding skipped, model not traceable (%s)", exc)
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    attrs = [str(n.target) for n in graph.nodes if n.op == "get_attr"]
    modules = dict(model.named_modules())
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.all_input_nodes) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = modules.get(src.target), modules.get(node.target)
        if ((type(conv), type(bn)) not in _PAIRS or calls[src.target] != 1
                or calls[node.target] != 1 or bn.training or not bn.track_running_stats
                or bn.running_mean is None or bn.running_var is None or conv.padding_mode != "zeros"
                or bn.num_features != conv.out_channels
                or any(a == t or a.startswith(t + ".") for a in attrs for t in (src.target, node.target))):
            continue
        _fold(conv, bn)
        _set(model, node.target, nn.Identity())
        folded.append(node.target)
    return folded


def _fold(conv: nn.modules.conv._ConvNd, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """``w' = w * scale``, ``b' = (b - mean) * scale + beta``, ``scale = gamma / sqrt(var + eps)``; in float64
    so the fold adds about one rounding per weight. New Parameters: a weight shared elsewhere is left alone."""
    with torch.no_grad():
        w = conv.weight.detach()
        var, mean = bn.running_var.double(), bn.running_mean.double()
        gamma = bn.weight.double() if bn.affine else torch.ones_like(var)
        beta = bn.bias.double() if bn.affine else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + bn.eps)
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(var)
        new_w = (w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        new_b = ((b - mean) * scale + beta).to(w.dtype)
    conv.weight = nn.Parameter(new_w, requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(new_b, requires_grad=False)


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
