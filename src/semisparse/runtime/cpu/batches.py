"""A deployed model that runs a batch one sample at a time, where the planner measured that faster.

At batch 1 a CNN's activations stay in the CPU's caches from one layer to the next; at batch 32 each layer
streams its whole input from memory (ResNet-50's 56x56 stage: ~100 MB a layer), and the condensed kernels, which
read each kept input for few outputs, run 1.2-1.7x slower per sample than at batch 1. In eval mode the samples of
a batch are independent, so the model computes the same outputs sample by sample; the planner keeps this only
where it measured it faster and the outputs equal the whole batch's (:func:`.planner.plan_batch`).

The per-sample loop is the model's own ``forward`` set on the instance (as :func:`.cpus.scriptable` sets
``__prepare_scriptable__``): ``nn.Module.__call__`` and the root's hooks run once around the whole batch, the
class and its ``state_dict`` stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SampleBySample", "install", "installed", "uninstall", "why_not_split"]


class SampleBySample:
    """A model's instance ``forward``: one positional tensor with a batch of 2 or more runs sample by sample
    (outputs concatenated); anything else, ``on`` False, the model in training mode or a forward hook on a
    submodule (it would see one sample at a time; hooks added after the deploy are looked for at each call, a
    few microseconds against a batch's milliseconds) runs the class's forward as it is."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.on = True

    def __call__(self, *args, **kwargs):
        model = self.model
        forward = type(model).forward.__get__(model)
        x = args[0] if len(args) == 1 and not kwargs else None
        if (not self.on or not isinstance(x, torch.Tensor) or x.dim() < 3 or x.shape[0] < 2 or model.training
                or torch.jit.is_tracing() or torch.compiler.is_compiling() or _hooked(model)):
            return forward(*args, **kwargs)
        outs = []
        for i in range(x.shape[0]):
            y = forward(x[i:i + 1])
            if not (isinstance(y, torch.Tensor) and y.dim() > 0 and y.shape[0] == 1):
                return forward(x)  # an output not stacked by sample: the whole batch as it is
            outs.append(y)
        return torch.cat(outs)


def _hooked(model: nn.Module) -> bool:
    """Whether a forward hook would see the samples one at a time: on a submodule, or on every module."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules() if m is not model)


def why_not_split(model: nn.Module, x) -> str:
    """"" when running ``model`` on ``x`` sample by sample may be tried, else why not (one line)."""
    if not (isinstance(x, torch.Tensor) and x.dim() >= 3 and x.shape[0] >= 2):
        return "the input is not one tensor of 3+ dimensions with a batch of 2 or more"
    if "forward" in model.__dict__:
        return "the model's forward is set on the instance"
    for name, mod in model.named_modules():
        if name and (mod._forward_hooks or mod._forward_pre_hooks):
            return f"{name} has forward hooks (they would see one sample at a time)"
        if isinstance(mod, _BatchNorm) and (mod.training or not mod.track_running_stats):
            return f"{name} normalises with batch statistics"
    return ""


def installed(model: nn.Module) -> SampleBySample | None:
    """The model's per-sample forward, or None."""
    fwd = model.__dict__.get("forward")
    return fwd if isinstance(fwd, SampleBySample) else None


def install(model: nn.Module) -> SampleBySample:
    """Make ``model`` run its batches sample by sample; returns the switch."""
    split = SampleBySample(model)
    model.__dict__["forward"] = split
    return split


def uninstall(model: nn.Module) -> None:
    """Back to the class's forward (nothing if it was not installed)."""
    if installed(model) is not None:
        del model.__dict__["forward"]
