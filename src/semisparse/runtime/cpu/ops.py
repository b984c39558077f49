"""Torch ops a deployed model may run on semisparse's kernels instead of torch's: max pooling (:mod:`.pool`) and
the exact GELU (here). torch's CPU GELU takes 4-9 cycles an element (ConvNeXt-T's 18 GELUs: ~5 ms of a 60 ms
2:4 forward on 2 AVX2 cores); :func:`kernels.gelu` computes it to within torch's own fp32 error. Each op is
swapped in at deploy, timed on the model's real input by the planner (:func:`.planner.plan_ops`), and given back
to torch where torch's is faster or the planner kept the model dense."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..swap import registered_names
from . import kernels
from .layers import SparseLinear
from .pool import MaxPool2d
from .pool import is_supported as is_supported_pool

__all__ = ["GELU", "KERNEL_OPS", "fuse_gelus", "swap_in", "to_torch"]


class GELU(nn.GELU):
    """``nn.GELU`` (exact form, ``approximate="none"``) whose fp32 forward may run semisparse's kernel;
    ``use_kernel`` is the planner's choice. Anything the kernel does not take goes to torch."""

    use_kernel: bool = True
    fused: bool = False  # computed by the condensed Linear before it (fuse_gelus): passes its input on

    @classmethod
    def from_module(cls, act: nn.GELU) -> GELU:
        return cls(act.approximate).train(act.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return x
        # (under torch.jit.trace / torch.export: torch's GELU, which a graph can hold; a ctypes call cannot)
        if self.use_kernel and self.approximate == "none" and x.dtype == torch.float32 and x.is_contiguous() and (
                x.numel() and not x.requires_grad and x.device.type == "cpu" and not torch.jit.is_tracing()
                and not torch.compiler.is_exporting()):  # fmt: skip
            y = kernels.gelu(x)
            if y is not None:
                return y
        return super().forward(x)

    def __prepare_scriptable__(self) -> nn.GELU:
        """``torch.jit.script`` compiles torch's own GELU (the kernel is a ctypes call; a fused GELU too, since
        the Linear before it becomes torch's own ``nn.Linear``, without it)."""
        return nn.GELU(self.approximate).train(self.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", fused into the Linear before" if self.fused else "")


#: The ops a deployed model may run on semisparse's kernels; each has ``use_kernel`` and gives torch's own
#: module back with ``__prepare_scriptable__``.
KERNEL_OPS = (MaxPool2d, GELU)


def swap_in(mod: nn.Module) -> nn.Module | None:
    """The kernel-backed form of ``mod`` (same arguments and mode), or None where there is none or ``mod``
    has backward hooks (the kernels record no autograd graph)."""
    if mod._backward_hooks or mod._backward_pre_hooks:
        return None
    if is_supported_pool(mod):
        return MaxPool2d.from_module(mod)
    if type(mod) is nn.GELU and mod.approximate == "none":
        return GELU.from_module(mod)
    return None


def to_torch(op: nn.Module) -> nn.Module:
    """torch's own module for a kernel-backed op (what it runs with ``use_kernel`` off)."""
    return op.__prepare_scriptable__()


def fuse_gelus(model: nn.Module) -> list[str]:
    """Fuse each :class:`GELU` into the condensed Linear it directly follows in an ``nn.Sequential`` (whose
    forward is ``nn.Sequential``'s): the Linear applies it to its output (in the rows4 kernel's registers: the
    output is written once, activated) and the GELU passes its input on. Only where nothing can tell: each
    module registered once, no forward hooks on the Linear nor hooks on the GELU. Returns the Linears' names."""
    names = registered_names(model)
    fused = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        mods = list(seq)
        for lin, act in zip(mods, mods[1:]):
            if (isinstance(lin, SparseLinear) and lin.kind == "Linear" and lin.mode == "condensed"
                    and not lin.activation and lin.values.dtype == torch.float32 and not lin._forward_hooks
                    and isinstance(act, GELU) and act.approximate == "none" and not act.fused
                    and not (act._forward_hooks or act._forward_pre_hooks)
                    and len(names[id(lin)]) == 1 and len(names[id(act)]) == 1):  # fmt: skip
                lin.activation = "gelu"
                act.fused = True
                fused.append(names[id(lin)][0])
    return fused
