"""Training checkpoints: torchvision's layout, written atomically, readable with ``weights_only=True``.

A checkpoint is a plain dict (``torch.save``) of tensors, numbers, strings, lists and dicts::

    model         state_dict, parametrization keys included (``conv1.parametrizations.weight.original``,
                  ``conv1.parametrizations.weight.0.mask``)
    optimizer, lr_scheduler, scaler, ema    their state_dicts (scaler/ema: None when unused)
    epoch         the last finished epoch (0-based)
    args          the run's options as a plain dict
    arch          ``model.semisparse_arch`` (rebuilds the model through ``semisparse.models``)
    sparsity      {"masks": ss.masks(model), "pattern": str | None, "method": str, "state": ... | None}
    rng           {"torch": uint8 tensor, "cuda": [uint8 tensors], "numpy": {...}, "python": [...]}
    step          optimizer steps taken so far

Files are written to a temporary name in the same folder and renamed over the target
(:func:`semisparse.io.files.atomic_write`), so a crash or a failing run never leaves a half-written or
overwritten ``checkpoint.pth``. :func:`load_training_checkpoint` rebuilds the model of such a file with its
masks (``semisparse report`` / ``export``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import PatternError, SemisparseError
from ..io.files import atomic_write, load_torch
from ..masking import sparsify
from ..masking.parametrization import detach_all, split_state_dict
from ..models import from_arch
from ..patterns import NM, FanIn, parse_pattern

REQUIRED_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "args")


def atomic_save(obj: object, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file + ``os.replace`` (atomic on POSIX)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state() -> dict:
    """Every RNG's state as tensors / plain values (``weights_only`` loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": _to_lists(random.getstate()),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: Mapping) -> None:
    """Restore what :func:`rng_state` saved (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``; a clear error if it is not one."""
    if not os.path.isfile(path):
        raise SemisparseError(f"checkpoint {path} does not exist")
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise SemisparseError(
            f"{path} is not a training checkpoint (expected a dict with keys {', '.join(REQUIRED_KEYS)})"
        )
    return ckpt


def check_arch(ckpt: Mapping, arch: Mapping, path: str) -> None:
    """Refuse a checkpoint written for another model (name, classes or constructor options differ)."""
    saved = ckpt.get("arch")
    if saved is not None and dict(saved) != dict(arch):
        raise SemisparseError(
            f"checkpoint {path} is of model {saved.get('name')!r} ({saved.get('num_classes')} classes), "
            f"but this run builds {arch.get('name')!r} ({arch.get('num_classes')} classes)"
        )


# ------------------------------------------------------------------------------------- reading a model


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes when every key has one."""
    state = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_training_checkpoint(
    path: str | os.PathLike, model: nn.Module | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild the model of a training checkpoint (``torch.load(weights_only=True)``, no pickle of code).

    The checkpoint holds ``model`` (a state_dict, parametrization keys allowed), ``arch`` (the
    ``create_model`` arguments), ``args`` and ``sparsity: {"masks": {"layer.weight": bool}, "pattern": ...}``.
    Dense weights are loaded, then the masks applied with ``ss.sparsify(masks=...)``: with the declared
    pattern when every mask honours it, else as constant fan-in when that holds, else unstructured.
    Returns ``(model, info)``; ``info`` has the checkpoint's ``sparsity`` entries other than the masks.
    """
    path = Path(path)
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict):
        raise SemisparseError(f"{path}: expected a dict checkpoint with a 'model' state_dict")
    state = ckpt.get("model", ckpt)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SemisparseError(f"{path}: 'model' is not a state_dict of tensors")
    if model is None:
        model = from_arch(ckpt.get("arch"), path)
    dense, found = split_state_dict(_strip_wrappers(state))
    detach_all(model)
    try:
        model.load_state_dict(dense, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:2]
        raise SemisparseError(f"{path}: the checkpoint does not fit the model ({' '.join(first)})") from None
    sparsity = ckpt.get("sparsity")
    sparsity = sparsity if isinstance(sparsity, dict) else {}
    masks = sparsity.get("masks") or found
    info = {k: v for k, v in sparsity.items() if k not in ("masks", "state")}  # state: DST's, not needed
    if masks:
        masks = {k: v.to(torch.bool) for k, v in masks.items()}
        _apply_masks(model, masks, sparsity.get("pattern"))
    if isinstance(ckpt.get("arch"), dict) and not hasattr(model, "semisparse_arch"):
        model.semisparse_arch = dict(ckpt["arch"])
    return model, info


def _apply_masks(model: nn.Module, masks: dict, declared: object) -> None:
    """Apply ``masks`` under the most specific structure they all honour (declared, fan-in, unstructured)."""
    tries: list = []
    if declared is not None:
        try:
            tries.append(parse_pattern(declared))
        except SemisparseError:
            pass
    tries += [FanIn(0.5), None]  # the fan-in value is unused with masks=: k comes from each mask
    last: Exception | None = None
    for pat in tries:
        try:
            sparsify(model, pat, masks=masks, pad=isinstance(pat, NM), overwrite=True)
            return
        except PatternError as exc:
            last = exc
        except SemisparseError as exc:
            if pat is None:
                raise
            last = exc
    raise last  # pragma: no cover - pattern None accepts any mask
