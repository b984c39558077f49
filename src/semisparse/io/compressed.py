"""Compressed checkpoints: ``save(model, path)`` / ``load(path, model=None)``, safetensors, no pickle.

A sparsified weight is stored as its kept values plus the smallest index form its structure allows,
read from the masks semisparse holds (never from zeros). Every weight is seen through its layout's
``(rows, K)`` view (conv: input channels innermost at each kernel tap), and values are stored in the
row-major order of the kept entries of that view.

* **N:M** (``target`` an :class:`~semisparse.NM`): for each kept value its index within its group of M,
  ``ceil(log2 M)`` bits, packed little-endian into bytes (2:4: 2 bits per kept value, 4 per byte, first
  value in the low bits: the metadata form of the sparse tensor cores). A padded kernel-tap layout keeps
  ``min(N, real taps)`` per group; the file pads each group to N with padding positions (value 0).
* **constant fan-in** (``target`` an int k; SRigL): a bitmap of alive rows (ablated neurons keep none),
  and ``(alive, k)`` column indices, int16 read as unsigned (int32 only when K > 65,536).
* **unstructured** (``target`` None; RigL): a bitmap of the weight, or CSR (per-row counts + column
  indices), whichever is smaller.

Tensor names: dense tensors under their original state_dict key (``bn1.running_mean``, and ``conv1.weight``
for a layer that is not sparse); a sparse ``conv1.weight`` as ``conv1.weight::values``, ``::nm``,
``::alive``, ``::cols``, ``::counts``, ``::bitmap`` and, with ``keep_dense``, ``::dense``. The header
metadata key ``"semisparse"`` holds JSON: format version, the model's ``semisparse_arch`` (so
``load(path)`` rebuilds it), per-layer structure, and a BLAKE2b digest of every tensor so a tampered
file is rejected.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import SemisparseError
from ..layout import Layout
from ..masking.parametrization import (
    Mask,
    SparseParametrization,
    Target,
    attach,
    detach_all,
    sparse_weights,
    split_state_dict,
)
from ..patterns import NM

FORMAT = "semisparse.compressed"
VERSION = 1
META_KEY = "semisparse"
SEP = "::"
#: Column indices up to this bound are stored as int16 read unsigned; wider views need int32.
INT16_LIMIT = 1 << 16

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}


# ----------------------------------------------------------------------------------------------- bits


def _int_dtype(bits: int) -> type:
    return np.uint8 if bits <= 8 else np.int64  # uint8 keeps a ViT's 43M 2-bit indices at 43 MB, not 344


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative ints ``(n,)`` (each < 2**bits) into a uint8 stream, little-endian, no gaps."""
    dt = _int_dtype(bits)
    v = values.detach().cpu().numpy().reshape(-1).astype(dt)
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole values per byte, first value in the low bits
        per = 8 // bits
        v = np.concatenate([v, np.zeros(-v.size % per, dtype=dt)]).reshape(-1, per)
        out = np.zeros(v.shape[0], dtype=np.uint8)
        for j in range(per):
            out |= v[:, j] << (j * bits)
        return torch.from_numpy(out)
    planes = ((v[:, None] >> np.arange(bits, dtype=dt)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` values ``(n,)``, uint8 for ``bits <= 8`` else int64."""
    raw = packed.cpu().numpy().reshape(-1)
    if raw.size * 8 < n * bits:
        raise SemisparseError(f"bit stream holds {raw.size * 8 // max(bits, 1)} values; {n} expected")
    dt = _int_dtype(bits)
    if 8 % bits == 0:
        per, low = 8 // bits, (1 << bits) - 1
        out = np.empty((raw.size, per), dtype=np.uint8)
        for j in range(per):
            out[:, j] = (raw >> (j * bits)) & low
        return torch.from_numpy(out.reshape(-1)[:n])
    flat = np.unpackbits(raw, bitorder="little")
    planes = flat[: n * bits].reshape(n, bits).astype(dt)
    return torch.from_numpy((planes << np.arange(bits, dtype=dt)).sum(1, dtype=dt))


def _pack_bool(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1), bitorder="little"))


def _unpack_bool(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = np.unpackbits(packed.cpu().numpy().reshape(-1), bitorder="little")
    if flat.size < n or flat[n:].any():
        raise SemisparseError(f"bitmap of {flat.size} bits does not describe {n} entries")
    return torch.from_numpy(flat[:n].astype(bool))


def _index_tensor(cols: torch.Tensor, width: int) -> tuple[torch.Tensor, str]:
    """Column indices as int16 (read unsigned) when ``width <= 65,536``, else int32."""
    if width <= INT16_LIMIT:
        c = cols.to(torch.int32)
        return torch.where(c >= 1 << 15, c - INT16_LIMIT, c).to(torch.int16), "int16"
    return cols.to(torch.int32), "int32"


def _read_index(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "int16" and t.dtype == torch.int16:
        return t.to(torch.int64) & 0xFFFF
    if kind == "int32" and t.dtype == torch.int32:
        return t.to(torch.int64)
    raise SemisparseError(f"index tensor has dtype {t.dtype}; the header declares {kind}")


# ------------------------------------------------------------------------------------------- encoding


def _target_json(target: Target) -> dict:
    if isinstance(target, NM):
        return {"kind": "nm", "n": target.n, "m": target.m}
    if isinstance(target, int):
        return {"kind": "fanin", "k": target}
    return {"kind": "unstructured"}


def _target_from_json(d: Mapping, where: str) -> Target:
    kind = d.get("kind")
    try:
        if kind == "nm":
            return NM(int(d["n"]), int(d["m"]))
        if kind == "fanin":
            k = int(d["k"])
            if k < 1:
                raise ValueError
            return k
        if kind == "unstructured":
            return None
    except (KeyError, TypeError, ValueError):
        pass
    raise SemisparseError(f"{where}: bad sparsity target {dict(d)!r} in the header")


def _nm_view_shape(layout: Layout, m: int) -> tuple[int, int]:
    """The N:M view shape: ``(rows, K)``; kernel-tap layouts ``(out * in/groups, taps padded to M)``."""
    if layout.mode == "taps":
        return (math.prod(layout.shape[:2]), layout.taps + (-layout.taps % m))
    return layout.view_shape


def _padding_view(layout: Layout, m: int) -> torch.Tensor:
    """True at the padding positions of a kernel-tap layout's ``(rows, K padded to M)`` view."""
    ones = torch.ones(layout.shape, dtype=torch.bool)
    return ~layout.to_view(ones, m, fill=False)


def _nm_view(mask: torch.Tensor, layout: Layout, nm: NM) -> torch.Tensor:
    """The ``(groups, M)`` view of an N:M mask in which every group keeps exactly N (padding filled in)."""
    if layout.mode != "taps":
        return layout.to_view(mask).reshape(-1, nm.m)
    view = layout.to_view(mask, nm.m, fill=False).reshape(-1, nm.m)
    pad = _padding_view(layout, nm.m).reshape(-1, nm.m)
    need = nm.n - view.sum(1, keepdim=True)
    return view | (pad & (pad.cumsum(1) <= need))


def _encode(
    key: str,
    p: SparseParametrization,
    effective: torch.Tensor,
    dense: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header entry and tensors of one sparse weight. ``effective`` = dense * mask, weight-shaped."""
    mask = p.hard_mask().detach().cpu().to(torch.bool)
    p.check(key)  # a file is only ever written for a mask that honours its declared structure
    layout, target = p.layout, p.target
    entry = {
        "layout": layout.mode,
        "shape": list(layout.shape),
        "target": _target_json(target),
        "dtype": str(dtype).removeprefix("torch."),
        "keep_dense": dense is not None,
    }
    tensors: dict[str, torch.Tensor] = {}
    w = effective.detach().cpu().to(dtype)
    if isinstance(target, NM):
        bits = max(1, math.ceil(math.log2(target.m)))
        groups = _nm_view(mask, layout, target)
        wv = (layout.to_view(w, target.m) if layout.mode == "taps" else layout.to_view(w)).reshape(
            -1, target.m
        )
        # in-group positions of the kept entries, row-major (group by group, ascending within a group)
        idx = torch.arange(target.m, dtype=torch.int16).expand_as(groups)[groups]
        tensors["values"] = wv[groups]
        tensors["nm"] = pack_bits(idx, bits)
        entry |= {"encoding": "nm", "bits": bits, "groups": groups.shape[0], "index_dtype": "uint8"}
    elif isinstance(target, int):
        view = layout.to_view(mask)
        alive = view.any(1)
        cols = torch.arange(view.shape[1], dtype=torch.int32).expand_as(view)[view].reshape(-1, target)
        idx, kind = _index_tensor(cols, view.shape[1])
        tensors["values"] = layout.to_view(w)[view]
        tensors["alive"] = _pack_bool(alive)
        tensors["cols"] = idx
        entry |= {
            "encoding": "fanin",
            "rows": view.shape[0],
            "width": view.shape[1],
            "alive": int(alive.sum()),
            "index_dtype": kind,
        }
    else:
        view = mask.reshape(mask.shape[0], -1)
        nnz, numel = int(view.sum()), view.numel()
        tensors["values"] = w.reshape(view.shape)[view]
        idx_bytes = 2 if view.shape[1] <= INT16_LIMIT else 4
        if nnz * idx_bytes + 4 * view.shape[0] < (numel + 7) // 8:
            idx, kind = _index_tensor(
                torch.arange(view.shape[1], dtype=torch.int32).expand_as(view)[view], view.shape[1]
            )
            tensors["counts"] = view.sum(1).to(torch.int32)
            tensors["cols"] = idx
            entry |= {"encoding": "csr", "index_dtype": kind}
        else:
            tensors["bitmap"] = _pack_bool(view)
            entry |= {"encoding": "bitmap", "index_dtype": "uint8"}
        entry |= {"rows": view.shape[0], "width": view.shape[1]}
    entry["kept"] = int(tensors["values"].numel())
    if dense is not None:
        tensors["dense"] = dense.detach().cpu().to(dtype).contiguous()
        tensors.pop("values")  # derivable from the dense weight and the mask
    return entry, {f"{key}{SEP}{name}": t.contiguous() for name, t in tensors.items()}


def _get(
    tensors: Mapping[str, torch.Tensor], key: str, name: str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    t = tensors.get(f"{key}{SEP}{name}")
    if t is None:
        raise SemisparseError(f"{key}: tensor {key}{SEP}{name} is missing from the file")
    if dtype is not None and t.dtype != dtype:
        raise SemisparseError(f"{key}{SEP}{name} has dtype {t.dtype}; expected {dtype}")
    return t


def _strictly_increasing(idx: torch.Tensor) -> bool:
    return idx.shape[-1] < 2 or bool((idx[..., 1:] > idx[..., :-1]).all())


def _decode(key: str, entry: Mapping, tensors: Mapping[str, torch.Tensor]) -> tuple[Mask, torch.Tensor]:
    """The ``Mask`` parametrization and the weight to put underneath it, validated against the header."""
    try:
        layout = Layout(str(entry["layout"]), tuple(int(s) for s in entry["shape"]))
        encoding = entry["encoding"]
        dtype = _DTYPES[entry["dtype"]]
        keep_dense = bool(entry["keep_dense"])
        kept = int(entry["kept"])
    except (KeyError, TypeError, ValueError):
        raise SemisparseError(f"{key}: malformed layer entry in the header") from None
    if layout.mode not in ("rows", "conv", "taps") or len(layout.shape) < 2 or min(layout.shape) < 1:
        raise SemisparseError(f"{key}: bad layout {layout.mode!r} {layout.shape} in the header")
    target = _target_from_json(entry.get("target", {}), key)
    numel = math.prod(layout.shape)

    if encoding == "nm":
        if not isinstance(target, NM):
            raise SemisparseError(f"{key}: N:M encoding with a {entry['target']} target")
        bits = max(1, math.ceil(math.log2(target.m)))
        vshape = _nm_view_shape(layout, target.m)
        if vshape[1] % target.m:
            raise SemisparseError(f"{key}: reduction length {vshape[1]} is not whole groups of {target.m}")
        groups = vshape[0] * vshape[1] // target.m
        if kept != groups * target.n or int(entry.get("groups", -1)) != groups:
            raise SemisparseError(
                f"{key}: header counts {kept} kept values; {target} of {layout.shape} keeps "
                f"{groups * target.n}"
            )
        packed = _get(tensors, key, "nm", torch.uint8)
        if packed.dim() != 1 or packed.numel() != (kept * bits + 7) // 8:
            raise SemisparseError(
                f"{key}: N:M metadata has {packed.numel()} bytes; expected {(kept * bits + 7) // 8}"
            )
        idx = unpack_bits(packed, bits, kept).reshape(groups, target.n)
        if bool((idx >= target.m).any()) or not _strictly_increasing(idx):
            raise SemisparseError(f"{key}: N:M indices out of range or repeated within a group")
        gview = torch.empty(groups, target.m, dtype=torch.bool)
        for j in range(target.m):  # no int64 scatter index: M passes over (groups, N) small ints
            gview[:, j] = (idx == j).any(1)
        mask = layout.from_view(gview.reshape(vshape))
        place = lambda vals: layout.from_view(_place(vals, gview, dtype).reshape(vshape))  # noqa: E731
    elif encoding == "fanin":
        if not isinstance(target, int):
            raise SemisparseError(f"{key}: fan-in encoding with a {entry['target']} target")
        rows, width = layout.view_shape
        if (int(entry.get("rows", -1)), int(entry.get("width", -1))) != (rows, width) or target > width:
            raise SemisparseError(f"{key}: fan-in header does not match shape {layout.shape}")
        alive = _unpack_bool(_get(tensors, key, "alive", torch.uint8), rows)
        n_alive = int(alive.sum())
        cols = _read_index(_get(tensors, key, "cols"), entry.get("index_dtype", "?"))
        if (
            n_alive != int(entry.get("alive", -1))
            or tuple(cols.shape) != (n_alive, target)
            or kept != n_alive * target
        ):
            raise SemisparseError(
                f"{key}: {n_alive} alive rows x fan-in {target} do not match the stored "
                f"indices {tuple(cols.shape)} / kept count {kept}"
            )
        if bool((cols >= width).any()) or not _strictly_increasing(cols):
            raise SemisparseError(f"{key}: column indices out of range [0, {width}) or not increasing")
        view = torch.zeros(rows, width, dtype=torch.bool)
        view[alive.nonzero()[:, 0, None], cols] = True
        mask = layout.from_view(view)
        place = lambda vals: layout.from_view(_place(vals, view, dtype))  # noqa: E731
    elif encoding in ("bitmap", "csr"):
        if target is not None:
            raise SemisparseError(f"{key}: {encoding} encoding with a {entry['target']} target")
        rows, width = layout.shape[0], numel // layout.shape[0]
        if (int(entry.get("rows", -1)), int(entry.get("width", -1))) != (rows, width):
            raise SemisparseError(f"{key}: header does not match shape {layout.shape}")
        if encoding == "bitmap":
            view = _unpack_bool(_get(tensors, key, "bitmap", torch.uint8), numel).reshape(rows, width)
        else:
            counts = _get(tensors, key, "counts", torch.int32).to(torch.int64)
            cols = _read_index(_get(tensors, key, "cols"), entry.get("index_dtype", "?"))
            if (
                tuple(counts.shape) != (rows,)
                or bool((counts < 0).any())
                or int(counts.sum()) != cols.numel()
            ):
                raise SemisparseError(
                    f"{key}: CSR row counts do not add up to the {cols.numel()} stored indices"
                )
            if bool((cols >= width).any()):
                raise SemisparseError(f"{key}: column indices out of range [0, {width})")
            row_of = torch.repeat_interleave(torch.arange(rows), counts)
            view = torch.zeros(rows, width, dtype=torch.bool)
            view[row_of, cols] = True
            if int(view.sum()) != cols.numel():
                raise SemisparseError(f"{key}: repeated column indices within a row")
        if int(view.sum()) != kept:
            raise SemisparseError(f"{key}: mask keeps {int(view.sum())} weights; the header says {kept}")
        mask = view.reshape(layout.shape)
        place = lambda vals: _place(vals, view, dtype).reshape(layout.shape)  # noqa: E731
    else:
        raise SemisparseError(f"{key}: unknown encoding {encoding!r}")

    if keep_dense:
        weight = _get(tensors, key, "dense", dtype)
        if tuple(weight.shape) != layout.shape:
            raise SemisparseError(
                f"{key}: dense weight has shape {tuple(weight.shape)}; expected {layout.shape}"
            )
    else:
        values = _get(tensors, key, "values", dtype)
        if values.dim() != 1 or values.numel() != kept:
            raise SemisparseError(f"{key}: {values.numel()} stored values; the mask keeps {kept}")
        weight = place(values)
    p = Mask(mask, layout, target)
    p.check(key)
    return p, weight


def _place(values: torch.Tensor, view: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(view.shape, dtype=dtype).masked_scatter_(view, values)


# ------------------------------------------------------------------------------------------ save/load


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """BLAKE2b over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return h.hexdigest()


def _param_prefixes(model: nn.Module) -> dict[str, str]:
    """``{"conv1.parametrizations.weight.": "conv1.weight"}`` for every semisparse-parametrized weight."""
    return {
        (f"{sw.name}." if sw.name else "") + f"parametrizations.{sw.param}.": sw.key
        for sw in sparse_weights(model)
    }


def save(
    model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None, keep_dense: bool = False
) -> Path:
    """Write ``model`` (sparsified or not) as a compressed safetensors file; returns the path.

    Sparse weights are stored as kept values plus indices (see the module docstring), everything else as
    it is. ``dtype`` (e.g. ``torch.float16``) converts every floating tensor; ``keep_dense=True`` also
    keeps the dense weight under each mask. The model's ``semisparse_arch`` is recorded so ``load(path)``
    can rebuild it. Writing is atomic (temporary file, then ``os.replace``).
    """
    from safetensors.torch import save_file

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise SemisparseError(f"dtype must be a floating torch dtype such as torch.float16, got {dtype!r}")
    path = Path(path)
    sparse = {sw.key: sw for sw in sparse_weights(model)}
    prefixes = _param_prefixes(model)
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
            t = t.to(dtype)
        tensors[name] = t.clone().contiguous()  # never shares storage (safetensors refuses shared tensors)
        dense_keys.append(name)
    with torch.no_grad():
        for key, sw in sparse.items():
            original = sw.original.detach()
            effective = original * sw.parametrization.hard_mask().to(original.dtype)
            entry, enc = _encode(
                key, sw.parametrization, effective, original if keep_dense else None, dtype or original.dtype
            )
            layers[key] = entry
            tensors.update(enc)
    arch = getattr(model, "semisparse_arch", None)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch if isinstance(arch, dict) else None,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "layers": layers,
        "dense": dense_keys,
        "digest": _digest(tensors),
    }
    try:
        meta = {META_KEY: json.dumps(header)}
    except TypeError as exc:
        raise SemisparseError(f"model.semisparse_arch must be JSON-serialisable: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a compressed file, validated for format and version (no tensors are read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # SafetensorError is not importable on every safetensors version
        raise SemisparseError(
            f"{path}: not a valid safetensors file (truncated or corrupted?): {exc}"
        ) from None
    return _parse_header(meta, path)


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
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SemisparseError(f"{path}: header does not describe a {FORMAT} file")
    if header.get("version") != VERSION:
        raise SemisparseError(
            f"{path}: format version {header.get('version')!r}; this semisparse reads version {VERSION}"
        )
    if not isinstance(header.get("layers"), dict) or not isinstance(header.get("dense"), list):
        raise SemisparseError(f"{path}: header lacks the layer table")
    return header


#: The tensors each encoding stores besides ``values`` (or ``dense`` with keep_dense).
_PARTS = {"nm": ("nm",), "fanin": ("alive", "cols"), "csr": ("counts", "cols"), "bitmap": ("bitmap",)}


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    header = read_header(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = f.get_tensor(name)
    except Exception as exc:
        raise SemisparseError(f"{path}: cannot read tensors (truncated or corrupted?): {exc}") from None
    if _digest(tensors) != header.get("digest"):
        raise SemisparseError(
            f"{path}: contents do not match the recorded digest (file tampered or corrupted)"
        )
    expected = set(header["dense"])
    for key, entry in header["layers"].items():
        if not isinstance(entry, dict) or entry.get("encoding") not in _PARTS:
            enc = entry.get("encoding") if isinstance(entry, dict) else entry
            raise SemisparseError(f"{path}: {key}: unknown encoding {enc!r}; expected {sorted(_PARTS)}")
        parts, keep_dense = _PARTS[entry["encoding"]], entry.get("keep_dense")
        expected |= {f"{key}{SEP}{part}" for part in (*parts, "dense" if keep_dense else "values")}
    if set(tensors) != expected or set(header["dense"]) & set(header["layers"]):
        extra = sorted(set(tensors) ^ expected)[:3]
        raise SemisparseError(f"{path}: tensors do not match the header (e.g. {extra})")
    return header, tensors


def _build(arch: Mapping | None, path: Path) -> nn.Module:
    if not arch or "name" not in arch:
        raise SemisparseError(
            f"{path}: the file records no model architecture; pass one: ss.load(path, model=...) "
            "(CLI: --model NAME)"
        )
    kw = dict(arch)
    return importlib.import_module("semisparse.models").create_model(
        kw.pop("name"), **kw
    )  # lazy: torchvision/timm


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Read a file written by :func:`save` into ``model``, or into the architecture the file records.

    Returns the model sparsified with :class:`~semisparse.masking.Mask` parametrizations: the same masks
    and structure targets (``ss.check`` passes), values equal to the saved model's effective weights (the
    dense weights underneath when saved with ``keep_dense``), ready for ``ss.deploy``. A truncated,
    tampered or foreign file raises :class:`~semisparse.SemisparseError`.
    """
    path = Path(path)
    header, tensors = _read(path)
    decoded = {}
    for key, entry in header["layers"].items():
        try:
            decoded[key] = _decode(key, entry, tensors)
        except SemisparseError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:  # a malformed header value
            raise SemisparseError(f"{path}: {key}: malformed layer entry ({exc})") from None
    if model is None:
        model = _build(header.get("arch"), path)
    detach_all(model)  # a given model that is sparsified already: start from its dense weights
    state = {name: tensors[name] for name in header["dense"]}
    for key, (_, weight) in decoded.items():
        state[key] = weight
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise SemisparseError(
            f"{path}: the model does not match the file (missing from the file: {missing[:3]}, not in the "
            f"model: {unexpected[:3]})"
        )
    for name, t in state.items():
        if tuple(own[name].shape) != tuple(t.shape):
            raise SemisparseError(
                f"{path}: {name} has shape {tuple(t.shape)} in the file; the model's is "
                f"{tuple(own[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    modules = dict(model.named_modules())
    for key, (p, _) in decoded.items():
        mod_name, _, param = key.rpartition(".")
        module = modules[mod_name]
        p.mask = p.mask.to(getattr(module, param).device)
        attach(module, param, p)
    return model


def sizes(path: str | os.PathLike) -> dict[str, int | float]:
    """File size against the same tensors stored dense in the same dtypes (header bytes excluded)."""
    from safetensors import safe_open

    path = Path(path)
    header = read_header(path)
    dense = 0
    with safe_open(str(path), framework="pt") as f:
        for name in header["dense"]:
            sl = f.get_slice(name)
            dense += math.prod(sl.get_shape()) * _DTYPES[_st_dtype(sl.get_dtype())].itemsize
    for entry in header["layers"].values():
        dense += math.prod(entry["shape"]) * _DTYPES[entry["dtype"]].itemsize
    size = path.stat().st_size
    return {"file_bytes": size, "dense_bytes": dense, "ratio": size / max(1, dense)}


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


# --------------------------------------------------------------------------------- training checkpoints


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
    from ..masking import sparsify

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SemisparseError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(ckpt, dict):
        raise SemisparseError(f"{path}: expected a dict checkpoint with a 'model' state_dict")
    state = ckpt.get("model", ckpt)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SemisparseError(f"{path}: 'model' is not a state_dict of tensors")
    if model is None:
        model = _build(ckpt.get("arch"), path)
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
        _apply_masks(model, masks, sparsity.get("pattern"), sparsify)
    if isinstance(ckpt.get("arch"), dict) and not hasattr(model, "semisparse_arch"):
        model.semisparse_arch = dict(ckpt["arch"])
    return model, info


def _apply_masks(model: nn.Module, masks: dict, declared: object, sparsify) -> None:
    """Apply ``masks`` under the most specific structure they all honour (declared, fan-in, unstructured)."""
    from ..errors import PatternError
    from ..patterns import FanIn, parse_pattern

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
