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

import contextlib
import math
import os
import random
from collections.abc import Iterator, Mapping
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


#: What a resealed or foreign checkpoint entry may raise when loaded into this run's objects.
LOAD_ERRORS = (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError)


@contextlib.contextmanager
def entry(path: object, name: str) -> Iterator[None]:
    """Turn an error loading checkpoint entry ``name`` into one line naming the file and the entry."""
    try:
        yield
    except LOAD_ERRORS as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        if str(path) in reason:
            raise SemisparseError(reason) from None
        raise SemisparseError(f"checkpoint {path}: '{name}' does not fit this run ({reason[:300]})") from None


def check_resumable(ckpt: Mapping, path: object, optimizer: torch.optim.Optimizer, lr_scheduler: object) -> None:
    """Refuse, in one line naming the entry, what a resume would otherwise trip over later (mid-epoch or at
    the epoch's end): an optimizer state of another shape or of non-finite values, a schedule that cannot
    step (``step_size`` 0), an RNG state that is not one."""
    check_optimizer_state(ckpt.get("optimizer"), optimizer, path)
    if lr_scheduler is not None and ckpt.get("lr_scheduler") is not None:
        check_scheduler_state(ckpt["lr_scheduler"], lr_scheduler.state_dict(), path)
    if ckpt.get("rng") is not None:
        check_rng_state(ckpt["rng"], path)


_MISSING = object()


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_optimizer_state(state: object, optimizer: torch.optim.Optimizer, path: object) -> None:
    """The saved optimizer state fits ``optimizer``: its groups, one state per parameter of that shape, finite."""

    def bad(what: str) -> SemisparseError:
        return SemisparseError(f"checkpoint {path}: 'optimizer{what}")

    if not isinstance(state, Mapping) or not isinstance(state.get("state"), Mapping) \
            or not isinstance(state.get("param_groups"), list):  # fmt: skip
        raise bad("' is not an optimizer state_dict (a dict of 'state' and 'param_groups')")
    groups, own = state["param_groups"], optimizer.param_groups
    sizes = [len(g["params"]) if isinstance(g, Mapping) and isinstance(g.get("params"), list)
             and all(_is_int(i) for i in g["params"]) else None for g in groups]  # fmt: skip
    if sizes != [len(g["params"]) for g in own]:
        raise bad(f".param_groups' holds groups of {sizes} parameters; this run's optimizer has "
                  f"{[len(g['params']) for g in own]}")
    params: dict = {}
    for i, (g, o) in enumerate(zip(groups, own)):
        params.update(zip(g["params"], o["params"]))
        for k, v in g.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise bad(f".param_groups[{i}].{k}' is {v}; expected a finite number")
        for k, mine in o.items():  # every setting this run's optimizer steps with, of the same kind
            if k == "params":
                continue
            v = g.get(k, _MISSING)
            if v is _MISSING:
                raise bad(f".param_groups[{i}]' lacks '{k}'")
            if _finite(mine) and not _finite(v) or isinstance(mine, bool) and not isinstance(v, bool) \
                    or isinstance(mine, (tuple, list)) and not (isinstance(v, (tuple, list)) and len(v) == len(mine)
                                                              and all(_finite(x) for x in v)):  # fmt: skip
                raise bad(f".param_groups[{i}].{k}' is {v!r}; this run's optimizer has {mine!r}")
    if len(params) != sum(len(g["params"]) for g in own):
        raise bad(".param_groups' names a parameter twice")
    for i, st in state["state"].items():
        if i not in params:
            raise bad(f".state' has an entry for parameter {i!r}, which no parameter group holds")
        if not isinstance(st, Mapping):
            raise bad(f".state[{i}]' is a {type(st).__name__}; expected a dict")
        shape = tuple(params[i].shape)
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                if v is not None and not (k == "step" and _finite(v)):  # the step count may be a number
                    raise bad(f".state[{i}].{k}' is {v!r}; expected a tensor")
                continue
            if v.dim() > 0 and tuple(v.shape) != shape:
                raise bad(f".state[{i}].{k}' has shape {tuple(v.shape)}; its parameter has shape {shape}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise bad(f".state[{i}].{k}' holds NaN or inf")


#: Scheduler entries a schedule divides by or counts with: a positive number.
_POSITIVE = ("step_size", "T_max", "T_0", "T_mult", "total_iters", "step_size_up", "step_size_down")


def check_scheduler_state(state: object, own: Mapping, path: object, where: str = "lr_scheduler") -> None:
    """The saved schedule has this run's scheduler's entries, with numbers it can step with."""
    if not isinstance(state, Mapping):
        raise SemisparseError(f"checkpoint {path}: '{where}' is a {type(state).__name__}; expected a dict")
    unknown = sorted(set(map(str, state)) - set(own))
    if unknown:
        raise SemisparseError(f"checkpoint {path}: '{where}' has entries this run's scheduler does not "
                              f"({', '.join(unknown[:3])})")  # fmt: skip
    for k, v in state.items():
        name = f"{where}.{k}"
        if k == "_schedulers":
            mine = own.get(k) or []
            if not isinstance(v, list) or len(v) != len(mine):
                raise SemisparseError(f"checkpoint {path}: '{name}' does not hold {len(mine)} schedulers")
            for j, (sv, ov) in enumerate(zip(v, mine)):
                check_scheduler_state(sv, ov, path, f"{name}[{j}]")
        elif k in _POSITIVE and v is not None and not (_finite(v) and v > 0):
            raise SemisparseError(f"checkpoint {path}: '{name}' is {v!r}; expected a positive number")
        elif k == "last_epoch" and not (isinstance(v, int) and not isinstance(v, bool) and v >= -1):
            raise SemisparseError(f"checkpoint {path}: '{name}' is {v!r}; expected an int >= -1")
        elif isinstance(v, float) and not math.isfinite(v):
            raise SemisparseError(f"checkpoint {path}: '{name}' is {v}; expected a finite number")
        elif isinstance(v, list) and k in ("base_lrs", "_last_lr") and not all(_finite(x) for x in v):
            raise SemisparseError(f"checkpoint {path}: '{name}' holds a value that is not a finite number")
        elif type(v) is not type(own.get(k, v)) and not (_finite(v) and _finite(own.get(k))):
            raise SemisparseError(f"checkpoint {path}: '{name}' is a {type(v).__name__}; this run's scheduler "
                                  f"has a {type(own[k]).__name__}")  # fmt: skip


def check_rng_state(state: object, path: object) -> None:
    """The saved RNG states are what :func:`rng_state` writes (the setters check little or crash later)."""

    def bad(what: str) -> SemisparseError:
        return SemisparseError(f"checkpoint {path}: 'rng{what}")

    if not isinstance(state, Mapping):
        raise bad("' is not a dict of RNG states")
    t = state.get("torch")
    want = torch.get_rng_state()
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.shape != want.shape:
        raise bad(f".torch' is not a CPU generator state (a uint8 tensor of {want.numel()} bytes)")
    n = state.get("numpy")
    ok = isinstance(n, Mapping) and isinstance(n.get("keys"), torch.Tensor) and n["keys"].numel() == 624 \
        and _is_int(n.get("pos")) and 0 <= n["pos"] <= 624 and n.get("has_gauss") in (0, 1) \
        and isinstance(n.get("gauss"), float)  # fmt: skip
    if not ok:
        raise bad(".numpy' is not a NumPy MT19937 state")
    py = state.get("python")
    ok = isinstance(py, list) and len(py) == 3 and py[0] == random.getstate()[0] and isinstance(py[1], list) \
        and len(py[1]) == 625 \
        and all(_is_int(x) and 0 <= x < 2**32 for x in py[1][:624]) and _is_int(py[1][624]) \
        and 0 <= py[1][624] <= 624 and (py[2] is None or isinstance(py[2], float))  # fmt: skip
    if not ok:
        raise bad(".python' is not a Python random state")
    cuda = state.get("cuda")
    if cuda is not None and not (isinstance(cuda, list) and all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8
                                                                for c in cuda)):  # fmt: skip
        raise bad(".cuda' is not a list of CUDA generator states")


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
    size = ckpt.get("input_size")
    if isinstance(size, (list, tuple)) and size and all(type(v) is int and v > 0 for v in size):
        model.semisparse_input_size = list(size)
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
