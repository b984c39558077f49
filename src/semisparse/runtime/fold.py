"""Deploy-time folds, on the deployed copy: eval BatchNorm into the convolution before it, and ablated
neurons of a Linear into the Linear after it (:func:`fold_ablated`, shared by the CPU and CUDA deploys).

An eval BatchNorm is a per-channel affine map, so ``bn(conv(x))`` equals a conv with rescaled output
channels and a shifted bias: the condensed kernel then does the BN for free, and the BN pass over the
activation is gone. Scaling whole output channels keeps masked weights zero, so masks stay as they are.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import fx, nn

from .swap import registered_names, replace_everywhere

__all__ = ["fold_batchnorm", "fold_ablated", "ELEMENTWISE"]

log = logging.getLogger(__name__)

_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


def fold_batchnorm(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
    """Fold every ``Conv{1,2,3}d -> BatchNorm{1,2,3}d`` pair of ``model`` in place; returns the BN names.

    Pairs are found on a ``torch.fx`` trace (analysis only: the model keeps its classes and forward); a
    folded BN becomes ``nn.Identity`` at its name, so the forward that still calls it is unchanged. Only
    a BN fed by nothing but the conv, whose conv output has no other user and both modules called once,
    is folded (anything else would change what the other users see), and neither may be registered under a
    second name or carry hooks. Untraceable model, or one whose forward takes optional arguments (the trace
    would fix the branch their defaults take): nothing folded. Convs without a mask are folded as well
    (``masks`` are not changed: see the module docstring).
    """
    if _optional_arguments(model):
        log.debug("semisparse: BatchNorm folding skipped, forward takes optional arguments")
        return []
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
    shared = {i for i, names in registered_names(model).items() if len(names) > 1}
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
                or bn.num_features != conv.out_channels or id(conv) in shared or id(bn) in shared
                or _hooked(conv) or _hooked(bn)
                or any(a == t or a.startswith(t + ".") for a in attrs for t in (src.target, node.target))):
            continue
        _fold(conv, bn)
        replace_everywhere(model, [node.target], nn.Identity())
        folded.append(node.target)
    return folded


def _optional_arguments(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes parameters with defaults or ``*args``/``**kwargs`` beyond its first."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return True
    return any(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _hooked(mod: nn.Module) -> bool:
    """Whether ``mod`` has forward or backward hooks (what they see would change with a rewrite)."""
    return bool(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks)


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


#: Modules applied elementwise (per feature) between two Linears: an ablated neuron's constant output goes
#: through them unchanged in kind, so it can be folded into the next Linear's bias.
ELEMENTWISE = (nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
               nn.LeakyReLU, nn.ELU, nn.Mish, nn.Dropout, nn.Identity)


def fold_ablated(model: nn.Module, masks: dict) -> dict[str, int]:
    """Remove ablated neurons of ``Linear -> elementwise* -> Linear`` chains inside ``nn.Sequential``s.

    The first Linear loses its all-zero mask rows, the second the matching input columns; the constant
    the removed neurons fed forward (``act(bias)``) is added to the second Linear's bias. Returns
    ``{second layer's key: columns dropped}``. Works on plain Linears with masks (before condensing).
    """
    dropped: dict[str, int] = {}
    shared = {i for i, names in registered_names(model).items() if len(names) > 1}
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = [n for n, _ in seq.named_children()]
        for i, a_name in enumerate(names):
            a = seq._modules[a_name]  # as the fold of the pair before left it (it may be that pair's second)
            akey = ".".join(p for p in (seq_name, a_name, "weight") if p)
            if type(a) is not nn.Linear or akey not in masks or id(a) in shared or _hooked(a):
                continue
            j = i + 1
            while j < len(names) and type(seq._modules[names[j]]) in ELEMENTWISE:
                j += 1
            if j >= len(names) or type(seq._modules[names[j]]) is not nn.Linear:
                continue
            b_name, b = names[j], seq._modules[names[j]]
            if id(b) in shared or _hooked(b) or any(id(seq._modules[n]) in shared or _hooked(seq._modules[n])
                                                    for n in names[i + 1:j]):
                continue
            bkey = ".".join(p for p in (seq_name, b_name, "weight") if p)
            amask = masks[akey]
            keep = amask.any(1)
            if bool(keep.all()) or not bool(keep.any()):
                continue
            gone = ~keep
            with torch.no_grad():
                const = a.bias[gone].clone() if a.bias is not None else torch.zeros(int(gone.sum()))
                for n in names[i + 1:j]:
                    const = seq._modules[n](const)
                wb = b.weight * masks[bkey] if bkey in masks else b.weight
                shift = wb[:, gone] @ const.to(wb.dtype)
                new_a = nn.Linear(a.in_features, int(keep.sum()), bias=a.bias is not None)
                new_a.weight.copy_(a.weight[keep])
                if a.bias is not None:
                    new_a.bias.copy_(a.bias[keep])
                new_b = nn.Linear(int(keep.sum()), b.out_features, bias=True)
                new_b.weight.copy_(b.weight[:, keep])
                new_b.bias.copy_((b.bias if b.bias is not None else torch.zeros(b.out_features)) + shift)
            setattr(seq, a_name, new_a)
            setattr(seq, b_name, new_b)
            masks[akey] = amask[keep]
            if bkey in masks:
                masks[bkey] = masks[bkey][:, keep]
            dropped[bkey] = int(gone.sum())
    return dropped
