"""Example inputs of a model to deploy: the guessed default, casting to the deployed dtype, describing one in
an error. Shared by the CPU deploy and :mod:`.cuda`."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import SemisparseError

__all__ = ["default_example_input", "recorded_input_size", "cast_example", "describe_example"]


def recorded_input_size(model: nn.Module) -> list[int] | None:
    """The input size (without batch) ``model`` was trained at, as its file or checkpoint records it
    (``model.semisparse_input_size``, e.g. ``[3, 32, 32]``); None where nothing records it."""
    size = getattr(model, "semisparse_input_size", None)
    if isinstance(size, (list, tuple)) and size and all(isinstance(v, int) and v > 0 for v in size):
        return list(size)
    return None


def default_example_input(model: nn.Module, batch_size: int = 1, size: int | None = None, *,
                          warn: bool = False) -> torch.Tensor:
    """``(batch, *size)`` for the input size the model records (:func:`recorded_input_size`), else
    ``(batch, C, S, S)`` for an image model (C from its first conv, S from the model's ``image_size``, which
    semisparse's models and torchvision's ViTs carry, or its arch's, else ``size``, else a guess of 224), or
    ``(batch, in_features)`` when the first layer is a Linear. ``warn``: say in one line (a ``UserWarning``)
    when the size is the guess of 224."""
    recorded = recorded_input_size(model)
    if recorded is not None:
        return torch.randn(batch_size, *recorded)
    arch = getattr(model, "semisparse_arch", None) or {}
    size = getattr(model, "image_size", None) or arch.get("image_size") or arch.get("img_size") or size
    for mod in model.modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nd = mod.weight.dim() - 2
            s = int(size) if size else 224
            x = torch.randn(batch_size, mod.in_channels, *([s] * nd))
            if warn and not size:  # no recorded size, no image_size, no size asked for
                warnings.warn(f"semisparse: no example_input and the model records no input size; planning at "
                              f"{tuple(x.shape)} (a guess): pass example_input=torch.randn(...) of the real size",
                              UserWarning, stacklevel=4)  # the caller of ss.deploy
            return x
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
