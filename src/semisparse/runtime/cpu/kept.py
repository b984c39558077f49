"""Layers the planner kept dense, as torch's own modules.

A deployed layer in dense mode still runs its wrapper's Python on every call (about a microsecond, and the
model's thread-sizing hooks on top): on a small model that made the deployed model slower than the dense one
it came from. Where the planner measured torch's layer faster (plain dense, not its 1x1 matrix-product form),
the deployed model holds torch's layer itself - ``nn.Linear`` / ``nn.ConvNd`` subclasses that add nothing to
the forward and only carry the planner's report row - so a layer kept dense costs what the original costs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...masking.coverage import LayerReport
from ..plain import carry_hooks
from .layers import SparseConv, SparseLinear

__all__ = ["KeptDenseLinear", "KeptDenseConv1d", "KeptDenseConv2d", "KeptDenseConv3d", "as_torch_layer"]


class _KeptDense:
    """Mixin: the planner's report row of the layer this module replaced (``ss.report`` reads it)."""

    # torch.jit.script compiles the layer without its report row (a class annotation made it fail)
    __jit_ignored_attributes__ = ["semisparse_row"]

    def semisparse_layer_report(self, name: str) -> LayerReport:
        return copy.copy(self.semisparse_row)


class KeptDenseLinear(_KeptDense, nn.Linear):
    """``nn.Linear`` holding a masked weight the planner kept dense."""


class KeptDenseConv1d(_KeptDense, nn.Conv1d):
    """``nn.Conv1d`` holding a masked weight the planner kept dense."""


class KeptDenseConv2d(_KeptDense, nn.Conv2d):
    """``nn.Conv2d`` holding a masked weight the planner kept dense."""


class KeptDenseConv3d(_KeptDense, nn.Conv3d):
    """``nn.Conv3d`` holding a masked weight the planner kept dense."""


def as_torch_layer(layer: SparseLinear | SparseConv) -> nn.Module:
    """torch's module computing what ``layer`` computes in dense mode (its masked weight and bias), without
    gradients, carrying ``layer``'s report row and forward hooks."""
    weight = layer.dense_weight if layer.dense_weight is not None else layer._dense_now()
    bias = layer.bias is not None
    with torch.device("meta"):  # no throwaway initialisation: the weights are copied in below
        if isinstance(layer, SparseLinear):
            mod = KeptDenseLinear(layer.in_features, layer.out_features, bias=bias)
        else:
            cls = (KeptDenseConv1d, KeptDenseConv2d, KeptDenseConv3d)[layer.nd - 1]
            mod = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                      layer.dilation, layer.groups, bias=bias)
    mod.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias:
        mod.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    mod.eval()
    row = layer.semisparse_layer_report("")
    row.macs = None  # counted on the example input by ss.report, as for any torch layer
    mod.semisparse_row = row
    return carry_hooks(layer, mod)
