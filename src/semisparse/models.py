"""``create_model(name, num_classes, weights)``: a model of the registry (:mod:`.registry`), optionally
with weights loaded from a file.

``weights`` is a local file (a state_dict, or a checkpoint holding one under ``model``) or a torchvision
weights enum name (``ResNet18_Weights.IMAGENET1K_V1``) whose file is already in the torch hub cache:
nothing is ever downloaded. The model gets ``model.semisparse_arch = {"name", "num_classes", **kw}``
(JSON-able) so a checkpoint can rebuild it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torchvision
from torch import nn

from .errors import SemisparseError
from .io.digest import verify as verify_digest
from .io.files import is_safetensors, load_torch
from .masking.parametrization import effective_state_dict
from .registry import (
    MODELS,
    arch_from_file,
    build_model,
    from_arch,
    list_models,
    register_model,
    state_mismatch,
    torchvision_names,
)

__all__ = ["arch_from_file", "create_model", "file_masks", "from_arch", "list_models", "load_weights",
           "register_model", "state_mismatch", "MODELS"]


def create_model(
    name: str, num_classes: int = 1000, weights: str | os.PathLike | None = None, **kw: object
) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs (:func:`~.registry.build_model`) and optionally load
    ``weights`` (see module doc). Extra ``kw`` go to the constructor and are recorded in
    ``model.semisparse_arch``.
    """
    model = build_model(name, num_classes, **kw)
    if weights is not None:
        load_weights(model, weights, name)
    return model


def _weights_enum(enum_name: str, model_name: str | None):
    """``ResNet18_Weights.IMAGENET1K_V1``, or ``IMAGENET1K_V1`` / ``DEFAULT`` of ``model_name``'s enum."""
    if "." not in enum_name and model_name in torchvision_names():
        enum = torchvision.models.get_model_weights(model_name)
        return enum.DEFAULT if enum_name == "DEFAULT" else enum[enum_name]
    return torchvision.models.get_weight(enum_name)


def _hub_file(enum_name: str, model_name: str | None = None) -> str:
    """Local path of a torchvision weights enum's file, or a clear error saying where to put it."""
    try:
        w = _weights_enum(enum_name, model_name)
    except (ValueError, KeyError, AttributeError) as exc:
        raise SemisparseError(
            f"--weights {enum_name!r} is neither a file nor a torchvision weights name "
            "(e.g. ResNet18_Weights.IMAGENET1K_V1, or IMAGENET1K_V1 / DEFAULT of a torchvision model)"
        ) from exc
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
    if not os.path.isfile(path):
        raise SemisparseError(
            f"weights {enum_name} are not in the local torch hub cache: nothing is downloaded; "
            f"fetch {w.url} and put it at {path}, or pass --weights PATH"
        )
    return path


def file_masks(obj: object) -> dict[str, torch.Tensor] | None:
    """The ``sparsity.masks`` a semisparse training checkpoint records (``{"layer.weight": bool}``), or None."""
    sparsity = obj.get("sparsity") if isinstance(obj, Mapping) else None
    masks = sparsity.get("masks") if isinstance(sparsity, Mapping) else None
    if not isinstance(masks, Mapping) or not all(isinstance(v, torch.Tensor) for v in masks.values()):
        return None
    return {str(k).removeprefix("module."): v.to(torch.bool) for k, v in masks.items()}


def load_weights(model: nn.Module, weights: str | os.PathLike, model_name: str | None = None) -> nn.Module:
    """Load a local file or a cached torchvision enum into ``model`` (strict; shapes must match).

    ``model_name`` (a torchvision name) lets ``weights`` be the enum member alone (``IMAGENET1K_V1``).

    Files are read with ``torch.load(weights_only=True)``: no arbitrary pickle. A semisparse checkpoint's
    masked weights load as their effective (masked) values: bool masks, and learned masks as the
    deterministic (argmax) masks the checkpoint records under ``sparsity.masks``. The masks themselves are
    not put on ``model`` (``semisparse train --weights`` does that, see ``semisparse.train.weights``).
    """
    path = os.fspath(weights)
    if not os.path.exists(path):
        path = _hub_file(path, model_name)
    if os.path.isfile(path) and is_safetensors(path):
        raise SemisparseError(
            f"weights {path} is a compressed semisparse (safetensors) file, not torch.save weights: load it in "
            "Python with ss.load(path), or pass the training checkpoint it was exported from"
        )
    obj = load_torch(path, "weights")
    if isinstance(obj, dict):  # a corrupted semisparse checkpoint is refused; torchvision's files record no digest
        verify_digest(obj, path, "weights")
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SemisparseError(f"weights {path} hold no state_dict (expected a dict of tensors, or one under 'model')")
    masks = file_masks(obj) if "model" in obj else None
    try:
        sd = effective_state_dict({k.removeprefix("module."): v for k, v in sd.items()}, masks)
    except SemisparseError as exc:
        raise SemisparseError(f"weights {path}: {exc}") from None
    wrong = state_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()},
                           {k: tuple(v.shape) for k, v in sd.items()})  # fmt: skip
    if wrong:
        raise SemisparseError(f"weights {path} do not fit this model ({wrong})")
    model.load_state_dict(sd)
    return model
