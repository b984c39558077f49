"""``--weights FILE`` for a run: plain weights, or a semisparse file whose masks the run keeps.

A training checkpoint (bool masks, or learned masks recorded as their argmax under ``sparsity.masks``) or a
compressed ``.safetensors`` file carries masks; :func:`load_run_weights` puts them on the model as fixed
masks (the dense weights underneath), or with ``keep_masks=False`` loads the effective weights only
(masked entries zero, no mask). A file without masks (torchvision weights, a dense run) loads as
:func:`semisparse.models.load_weights` does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ..io import compressed
from ..io.files import is_safetensors, load_torch
from ..masking.parametrization import detach_all, sparse_weights
from ..models import file_masks, load_weights
from ..patterns import NM
from .checkpoint import load_training_checkpoint


@dataclass
class WeightsInfo:
    """What ``--weights`` held: ``masked`` (it carries masks), their common ``pattern`` ("2:4", or None when
    the layers differ or are not N:M), how many masked weights, and the run's ``args`` when it recorded them."""

    masked: bool = False
    pattern: str | None = None
    layers: int = 0
    args: dict | None = None
    kind: str = "weights"  # weights | checkpoint | compressed


def carries_masks(path: str | os.PathLike) -> bool:
    """True when ``path`` is a compressed file, or a training checkpoint recording masks."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    if is_safetensors(path):
        return True
    obj = load_torch(path, "weights")
    return _checkpoint_masks(obj)


def _checkpoint_masks(obj: object) -> bool:
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        return False
    return bool(file_masks(obj)) or any(".parametrizations." in f".{k}" for k in obj["model"])


def common_pattern(model: nn.Module) -> str | None:
    """The one N:M pattern every mask of ``model`` declares, else None."""
    targets = {str(sw.parametrization.target) for sw in sparse_weights(model)
               if isinstance(sw.parametrization.target, NM)}  # fmt: skip
    others = any(not isinstance(sw.parametrization.target, NM) for sw in sparse_weights(model))
    return targets.pop() if len(targets) == 1 and not others else None


def load_run_weights(model: nn.Module, path: str | os.PathLike, keep_masks: bool = True) -> WeightsInfo:
    """Load ``path`` into ``model`` (see the module doc); ``model`` is unchanged when this raises."""
    path = os.fspath(path)
    if os.path.isfile(path) and is_safetensors(path):
        compressed.load(path, model)
        info = WeightsInfo(masked=True, kind="compressed")
    else:
        obj = load_torch(path, "weights") if os.path.isfile(path) else None
        if obj is None or not _checkpoint_masks(obj):
            load_weights(model, path, getattr(model, "semisparse_arch", {}).get("name"))
            return WeightsInfo()
        load_training_checkpoint(path, model)
        args = obj.get("args") if isinstance(obj.get("args"), Mapping) else None
        info = WeightsInfo(masked=True, kind="checkpoint", args=dict(args) if args else None)
    info.layers = sum(1 for _ in sparse_weights(model))
    info.pattern = common_pattern(model)
    if not keep_masks:
        detach_all(model, bake=True)
    return info
