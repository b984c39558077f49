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
    metrics       the epoch's record, as its ``metrics.jsonl`` line holds it (restored on resume if missing)
    digest        ``semisparse.io.digest.digest`` of everything above, recorded when written

Files are written to a temporary name in the same folder and renamed over the target
(:func:`semisparse.io.files.atomic_write`), so a crash or a failing run never leaves a half-written or
overwritten ``checkpoint.pth``. Every reader (:func:`load_checkpoint` for ``--resume``,
:func:`load_training_checkpoint` for ``semisparse report`` / ``export``, ``--weights``) verifies the digest:
a corrupted file is refused in one line, a file without one (older semisparse) loads after a one-line note.
The digest detects accidental corruption, not deliberate tampering (whoever edits a file can recompute it).
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
from ..io.digest import KEY as DIGEST_KEY
from ..io.digest import seal
from ..io.digest import verify as verify_digest
from ..io.files import atomic_write, load_torch
from ..masking import sparsify
from ..masking.parametrization import detach_all, sparse_weights, split_state_dict
from ..models import from_arch, state_mismatch
from ..patterns import NM, FanIn, parse_pattern

REQUIRED_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "args")


def atomic_save(obj: object, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file + ``os.replace`` (atomic on POSIX).

    A dict is written with its digest (:func:`semisparse.io.digest.seal`) unless it carries one already
    (sealed once, written as ``model_N.pth`` and ``checkpoint.pth``).
    """
    if isinstance(obj, Mapping) and DIGEST_KEY not in obj:
        obj = seal(obj)
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
    """Read a checkpoint with ``torch.load(weights_only=True)``; a clear error if it is not one.

    The digest is verified and the fields a resume reads are checked (one line naming the field).
    """
    if not os.path.exists(path):
        raise SemisparseError(f"checkpoint {path} does not exist")
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise SemisparseError(
            f"{path} is not a training checkpoint (expected a dict with keys {', '.join(REQUIRED_KEYS)})"
        )
    verify_digest(ckpt, path)
    check_fields(ckpt, path)
    return ckpt


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_dict(x: object) -> bool:
    return isinstance(x, Mapping) and all(isinstance(v, torch.Tensor) for v in x.values())


def check_fields(ckpt: Mapping, path: object) -> None:
    """Refuse, in one line, a checkpoint field of the wrong kind (``epoch: "x"``, a ``model`` of non-tensors)."""

    def bad(field: str, expected: str) -> SemisparseError:
        value = repr(ckpt[field]) if not isinstance(ckpt[field], (Mapping, list)) else type(ckpt[field]).__name__
        return SemisparseError(f"checkpoint {path}: '{field}' is {value[:60]}; expected {expected}")

    if "epoch" in ckpt and not (_is_int(ckpt["epoch"]) and ckpt["epoch"] >= -1):
        raise bad("epoch", "the last finished epoch as an int")
    if "step" in ckpt and not (_is_int(ckpt["step"]) and ckpt["step"] >= 0):
        raise bad("step", "the optimizer steps taken as an int")
    if "model" in ckpt and not _tensor_dict(ckpt["model"]):
        raise bad("model", "a state_dict (a dict of tensors)")
    for field in ("args", "arch", "sparsity", "optimizer", "metrics"):
        if ckpt.get(field) is not None and not isinstance(ckpt[field], Mapping):
            raise bad(field, "a dict")
    masks = (ckpt.get("sparsity") or {}).get("masks")
    if masks is not None and not _tensor_dict(masks):
        raise SemisparseError(f"checkpoint {path}: 'sparsity.masks' is not a dict of tensors")


def check_masks(model: nn.Module, path: object) -> None:
    """Every mask of ``model`` honours the pattern its layer declares (``ss.check``), or one line naming it."""
    for sw in sparse_weights(model):
        try:
            sw.parametrization.check(sw.key)
        except PatternError as exc:
            raise SemisparseError(
                f"checkpoint {path}: {exc} (its masks break the pattern the checkpoint declares)"
            ) from None


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

    Everything is checked before ``model`` is touched (digest, fields, tensor shapes against the model, the
    masks): a failed load leaves it as it was. Without ``model`` the recorded architecture is built on the
    meta device first and compared with the tensors the file holds, so nothing larger is ever allocated.
    """
    path = Path(path)
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict):
        raise SemisparseError(f"{path}: expected a dict checkpoint with a 'model' state_dict")
    verify_digest(ckpt, path)
    state = ckpt.get("model", ckpt)
    if not _tensor_dict(state):
        raise SemisparseError(f"{path}: 'model' is not a state_dict of tensors")
    if "model" in ckpt:
        check_fields(ckpt, path)
    dense, found = split_state_dict(_strip_wrappers(state))
    sparsity = ckpt.get("sparsity")
    sparsity = sparsity if isinstance(sparsity, Mapping) else {}
    masks = sparsity.get("masks") or found
    shapes = {k: tuple(v.shape) for k, v in dense.items()}
    for key, m in masks.items():
        if key not in shapes or tuple(m.shape) != shapes[key]:
            got = tuple(m.shape)
            raise SemisparseError(f"{path}: the mask of {key} {got} matches no weight of the checkpoint's model")
    if model is None:
        model = from_arch(ckpt.get("arch"), path, shapes)
    else:
        wrong = state_mismatch({k: tuple(v.shape) for k, v in split_state_dict(model.state_dict())[0].items()},
                               shapes)  # fmt: skip
        if wrong:
            raise SemisparseError(f"{path}: the checkpoint does not fit the model ({wrong})")
    info = {k: v for k, v in sparsity.items() if k not in ("masks", "state")}  # state: DST's, not needed
    if masks:  # validated by ss.sparsify before it changes anything
        _apply_masks(model, {k: v.to(torch.bool) for k, v in masks.items()}, sparsity.get("pattern"))
    else:
        detach_all(model)
    _load_dense(model, dense)
    if isinstance(ckpt.get("arch"), dict) and not hasattr(model, "semisparse_arch"):
        model.semisparse_arch = dict(ckpt["arch"])
    return model, info


def _load_dense(model: nn.Module, dense: Mapping[str, torch.Tensor]) -> None:
    """Load plain-keyed ``dense`` weights into ``model``, under its masks where it has them."""
    under = {sw.key: sw.state_prefix + "original" for sw in sparse_weights(model)}
    result = model.load_state_dict({under.get(k, k): v for k, v in dense.items()}, strict=False)
    missing = [k for k in result.missing_keys if ".parametrizations." not in f".{k}"]
    if missing or result.unexpected_keys:  # pragma: no cover - shapes and keys were checked above
        raise SemisparseError(f"the checkpoint does not fit the model ({missing[:3]}, {result.unexpected_keys[:3]})")


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
