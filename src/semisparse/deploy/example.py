"""Example inputs of a model to deploy: the guessed default, casting to the deployed dtype, describing one in
an error. Shared by the CPU deploy and :mod:`.cuda`."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SemisparseError

__all__ = ["default_example_input", "cast_example", "describe_example"]


def default_example_input(model: nn.Module, batch_size: int = 1, size: int | None = None) -> torch.Tensor:
    """``(batch, C, S, S)`` for an image model (C from its first conv, S from the model's ``image_size``,
    which semisparse's models and torchvision's ViTs carry, or its arch's, else ``size``, else 224), or
    ``(batch, in_features)`` when the first layer is a Linear."""
    arch = getattr(model, "semisparse_arch", None) or {}
    size = getattr(model, "image_size", None) or arch.get("image_size") or arch.get("img_size") or size
    for mod in model.modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nd = mod.weight.dim() - 2
            s = int(size) if size else 224
            return torch.randn(batch_size, mod.in_channels, *([s] * nd))
        if isinstance(mod, nn.Linear):
            return torch.randn(batch_size, mod.in_features)
    raise SemisparseError("cannot guess the model's input shape; pass example_input=torch.randn(...)")


def cast_example(x, dtype: torch.dtype | None):
    """``x`` (a tensor, or a tuple / dict of them) with its floating tensors in ``dtype``."""
    if dtype is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(cast_example(t, dtype) for t in x)
    if isinstance(x, dict):
        return {k: cast_example(v, dtype) for k, v in x.items()}
    return x


def describe_example(x) -> str:
    """Shapes and dtypes of an example input, for one-line errors: ``(2, 3, 224, 224) float32``."""
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, (list, tuple)):
        return "(" + ", ".join(describe_example(t) for t in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {describe_example(v)}" for k, v in x.items()) + "}"
    return type(x).__name__
