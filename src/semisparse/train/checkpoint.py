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

Files are written to a temporary name in the same folder and renamed over the target, so a crash or a
failing run never leaves a half-written or overwritten ``checkpoint.pth``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping

import numpy as np
import torch

from ..errors import SemisparseError

REQUIRED_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "args")


def atomic_save(obj: object, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file + ``os.replace`` (atomic on POSIX)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SemisparseError(f"cannot read checkpoint {path}: corrupted or not a torch checkpoint ({reason})") from exc
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
