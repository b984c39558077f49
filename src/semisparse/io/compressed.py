"""Compressed checkpoints: ``save(model, path)`` / ``load(path, model=None)``, safetensors, no pickle.

A sparsified weight is stored as its kept values plus the smallest index form its structure allows
(:mod:`.codec`); everything else as it is. Tensor names: dense tensors under their original state_dict key
(``bn1.running_mean``, and ``conv1.weight`` for a layer that is not sparse); a sparse ``conv1.weight`` as
``conv1.weight::values``, ``::nm``, ``::alive``, ``::cols``, ``::counts``, ``::bitmap`` and, with
``keep_dense``, ``::dense``. The header metadata key ``"semisparse"`` holds JSON: format version, the model's
``semisparse_arch`` (so ``load(path)`` rebuilds it), per-layer structure, and a digest
(:mod:`semisparse.io.digest`) of the rest of the header and of every tensor, so a corrupted file is refused.
(Version 1 files, written before the digest covered the header, load after a one-line note.)

Nothing in a file drives a load further than its tensors: the architecture's options are allow-listed
(never a path: :func:`semisparse.registry.arch_from_file`), the model is built on the meta device and compared
with the file's tensors before anything is allocated, and no layer may declare far more weights than it
stores (:data:`semisparse.io.codec.MAX_EXPANSION`). A failed ``load(path, model=m)`` leaves ``m`` as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import SemisparseError, UnverifiedFileWarning
from ..masking.parametrization import attach, detach_all, sparse_weights, split_state_dict
from ..registry import from_arch, state_mismatch
from .codec import DTYPES, PARTS, SEP, check_entry, check_size, decode, encode
from .digest import corrupted, digest
from .files import atomic_write, check_depth, check_file

FORMAT = "semisparse.compressed"
VERSION = 2
#: Versions this semisparse reads (1: the digest covers the tensors only).
READS = (1, 2)
META_KEY = "semisparse"

# ------------------------------------------------------------------------------------------ save/load


def _file_digest(header: Mapping, tensors: Mapping[str, torch.Tensor]) -> str:
    """The digest of a version-2 file: the header (its digest left out) and every tensor."""
    return digest({"header": {k: v for k, v in header.items() if k != "digest"}, "tensors": dict(tensors)})


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Version 1's digest: BLAKE2b over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return h.hexdigest()


def save(
    model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None, keep_dense: bool = False
) -> Path:
    """Write ``model`` (sparsified or not) as a compressed safetensors file; returns the path.

    Sparse weights are stored as kept values plus indices (see the module docstring), everything else as
    it is. ``dtype`` (e.g. ``torch.float16``) converts every floating tensor; ``keep_dense=True`` also
    keeps the dense weight under each mask. The model's ``semisparse_arch`` is recorded so ``load(path)``
    can rebuild it. Writing is atomic (temporary file, then ``os.replace``).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise SemisparseError(f"dtype must be a floating torch dtype such as torch.float16, got {dtype!r}")
    path = Path(path)
    sparse = {sw.key: sw for sw in sparse_weights(model)}
    prefixes = [sw.state_prefix for sw in sparse.values()]
    layers: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    dense_keys: list[str] = []
    for name, t in model.state_dict(keep_vars=False).items():
        if any(name.startswith(pre) for pre in prefixes):
            continue  # original / mask / learned-mask buffers: replaced by the encoded weight below
        if SEP in name:
            raise SemisparseError(f"state_dict key {name!r} contains {SEP!r}, which the file format reserves")
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = _narrowed(name, t, dtype)
        tensors[name] = t.clone().contiguous()  # never shares storage (safetensors refuses shared tensors)
        dense_keys.append(name)
    with torch.no_grad():
        for key, sw in sparse.items():
            original = sw.original.detach()
            effective = original * sw.parametrization.hard_mask().to(original.dtype)
            if dtype is not None:  # refused before a file is touched
                _narrowed(key, effective, dtype)
                if keep_dense:
                    _narrowed(key, original, dtype)
            entry, enc = encode(
                key, sw.parametrization, effective, original if keep_dense else None, dtype or original.dtype
            )
            layers[key] = entry
            tensors.update(enc)
    arch = getattr(model, "semisparse_arch", None)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch if isinstance(arch, dict) else None,
        "input_size": _input_size(getattr(model, "semisparse_input_size", None)),  # trained at (C, H, W)
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "layers": layers,
        "dense": dense_keys,
    }
    try:
        header = json.loads(json.dumps(header))  # the digest is of the header as a reader will parse it
    except TypeError as exc:
        raise SemisparseError(f"model.semisparse_arch must be JSON-serialisable: {exc}") from None
    header["digest"] = _file_digest(header, tensors)
    meta = {META_KEY: json.dumps(header)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def _narrowed(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, or one line naming ``name`` when a finite value would become inf (1e5 in float16)."""
    out = t.to(dtype)
    overflow = torch.isinf(out) & torch.isfinite(t)
    if overflow.any():
        big = t[overflow].abs().max().item()
        raise SemisparseError(
            f"cannot store {name} as {str(dtype).removeprefix('torch.')}: it holds {big:g} (largest magnitude), "
            f"beyond the {torch.finfo(dtype).max:g} that type holds; save it in a wider dtype (float32, bfloat16)"
        )
    return out


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a compressed file, validated for format and version (no tensors are read)."""
    path = Path(path)
    check_file(path, "compressed file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # SafetensorError is not importable on every safetensors version
        if _torch_save_file(path):
            raise SemisparseError(
                f"{path} is a training checkpoint (torch.save), not a compressed file: run `semisparse export "
                f"{path}` first, or evaluate it with `semisparse eval {path}`"
            ) from None
        raise SemisparseError(
            f"{path}: not a valid safetensors file (truncated or corrupted?): {exc}"
        ) from None
    return _parse_header(meta, path)


def _torch_save_file(path: Path) -> bool:
    """True when ``path`` starts as ``torch.save`` writes (a zip archive, or a legacy pickle)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _parse_header(meta: Mapping[str, str], path: Path) -> dict:
    if META_KEY not in meta:
        raise SemisparseError(
            f"{path}: a safetensors file but not a semisparse compressed checkpoint "
            "(no 'semisparse' metadata); write one with ss.save(model, path)"
        )
    try:
        header = json.loads(meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise SemisparseError(f"{path}: corrupted semisparse header ({exc})") from None
    except RecursionError:
        raise SemisparseError(f"{path}: corrupted semisparse header (nested too deeply to parse)") from None
    check_depth(header, f"compressed file {path}: its header")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SemisparseError(f"{path}: header does not describe a {FORMAT} file")
    if header.get("version") not in READS:
        raise SemisparseError(
            f"{path}: format version {header.get('version')!r}; this semisparse reads versions "
            f"{', '.join(map(str, READS))}"
        )
    if not isinstance(header.get("layers"), dict) or not isinstance(header.get("dense"), list):
        raise SemisparseError(f"{path}: header lacks the layer table")
    if not all(isinstance(k, str) for k in header["dense"]):
        raise SemisparseError(f"{path}: the header's list of dense tensors holds a non-name")
    arch = header.get("arch")
    if arch is not None and not isinstance(arch, dict):
        raise SemisparseError(f"{path}: the header's arch is a {type(arch).__name__}; expected a mapping or null")
    for key, entry in header["layers"].items():
        check_entry(key, entry, path)
    return header


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    header = read_header(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = f.get_tensor(name)
    except Exception as exc:
        raise SemisparseError(f"{path}: cannot read tensors (truncated or corrupted?): {exc}") from None
    if header["version"] == 1:
        if _digest(tensors) != header.get("digest"):
            raise corrupted(path, "compressed file")
        warnings.warn(
            f"compressed file {path} was written by an older semisparse (format 1): its digest covers the "
            "tensors but not the header; save it again to cover both",
            UnverifiedFileWarning,
            stacklevel=3,
        )
    elif _file_digest(header, tensors) != header.get("digest"):
        raise corrupted(path, "compressed file")
    expected = set(header["dense"])
    for key, entry in header["layers"].items():
        parts, keep_dense = PARTS[entry["encoding"]], entry["keep_dense"]
        expected |= {f"{key}{SEP}{part}" for part in (*parts, "dense" if keep_dense else "values")}
    if set(tensors) != expected or set(header["dense"]) & set(header["layers"]):
        extra = sorted(set(tensors) ^ expected)[:3]
        raise SemisparseError(f"{path}: tensors do not match the header (e.g. {extra})")
    return header, tensors


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Read a file written by :func:`save` into ``model``, or into the architecture the file records.

    Returns the model sparsified with :class:`~semisparse.masking.Mask` parametrizations: the same masks
    and structure targets (``ss.check`` passes), values equal to the saved model's effective weights (the
    dense weights underneath when saved with ``keep_dense``), ready for ``ss.deploy``. A truncated,
    corrupted or foreign file, or one that does not fit ``model``, raises :class:`~semisparse.SemisparseError`
    and leaves ``model`` (its state_dict and its masks) as it was.
    """
    path = Path(path)
    header, tensors = _read(path)
    for key, entry in header["layers"].items():
        check_size(key, entry, tensors, path)  # before decoding allocates the layer's mask
    shapes = {name: tuple(tensors[name].shape) for name in header["dense"]}
    shapes |= {key: tuple(entry["shape"]) for key, entry in header["layers"].items()}
    if model is None:
        model = from_arch(header.get("arch"), path, shapes)  # built on the meta device first, compared
    else:
        own = {k: tuple(v.shape) for k, v in split_state_dict(model.state_dict())[0].items()}
        wrong = state_mismatch(own, shapes)
        if wrong:
            raise SemisparseError(f"{path}: the model does not match the file ({wrong})")
    params = {f"{name}.{p}" if name else p for name, mod in model.named_modules() for p in _param_names(mod)}
    for key in header["layers"]:
        if key not in params:
            raise SemisparseError(f"{path}: {key} is stored as a sparse weight, but it is not a parameter of the model")
    decoded = {}
    for key, entry in header["layers"].items():
        try:
            decoded[key] = decode(key, entry, tensors)
        except SemisparseError as exc:
            raise SemisparseError(f"{path}: {exc}") from None
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError, OverflowError) as exc:  # a malformed value
            raise SemisparseError(f"{path}: {key}: malformed layer entry ({exc})") from None
    # Everything is checked: only now is the model changed.
    detach_all(model)  # a given model that is sparsified already: start from its dense weights
    state = {name: tensors[name] for name in header["dense"]}
    for key, (_, weight) in decoded.items():
        state[key] = weight
    model.load_state_dict(state, strict=True)
    modules = dict(model.named_modules())
    for key, (p, _) in decoded.items():
        mod_name, _, param = key.rpartition(".")
        module = modules[mod_name]
        p.mask = p.mask.to(getattr(module, param).device)
        attach(module, param, p)
    size = _input_size(header.get("input_size"))
    if size is not None:
        model.semisparse_input_size = size
    return model


def _input_size(size: object) -> list[int] | None:
    """A recorded input size ``[C, H, W]`` (positive ints), or None for anything else."""
    if isinstance(size, (list, tuple)) and 0 < len(size) <= 4 and all(type(v) is int and v > 0 for v in size):
        return list(size)
    return None


def _param_names(module: nn.Module) -> list[str]:
    """A module's own parameter names, the ones under a parametrization included."""
    names = list(module._parameters)
    plist = getattr(module, "parametrizations", None)
    return names + (list(plist.keys()) if plist is not None else [])


def verify(path: str | os.PathLike) -> dict:
    """Read every tensor of a compressed file and check its digest and table; returns the header."""
    return _read(Path(path))[0]


def sizes(path: str | os.PathLike) -> dict[str, int | float]:
    """File size against the same tensors stored dense in the same dtypes (header bytes excluded)."""
    path = Path(path)
    header = read_header(path)
    dense = 0
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in header["dense"]:
                sl = f.get_slice(name)
                dense += math.prod(sl.get_shape()) * DTYPES[_st_dtype(sl.get_dtype())].itemsize
    except Exception as exc:  # SafetensorError: a name the header lists that the file lacks
        raise SemisparseError(f"{path}: tensors do not match the header ({_first_line(exc)})") from None
    for entry in header["layers"].values():
        dense += math.prod(entry["shape"]) * DTYPES[entry["dtype"]].itemsize
    size = path.stat().st_size
    return {"file_bytes": size, "dense_bytes": dense, "ratio": size / max(1, dense)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _st_dtype(code: str) -> str:
    return {
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "F64": "float64",
        "U8": "uint8",
        "I8": "int8",
        "I16": "int16",
        "I32": "int32",
        "I64": "int64",
        "BOOL": "bool",
    }.get(code, "uint8")
