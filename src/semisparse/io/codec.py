"""Encoding of one sparse weight: kept values plus the smallest index form its structure allows.

Read from the mask semisparse holds (never from zeros). Every weight is seen through its layout's
``(rows, K)`` view (conv: input channels innermost at each kernel tap), and values are stored in the
row-major order of the kept entries of that view.

* **N:M** (``target`` an :class:`~semisparse.NM`): for each kept value its index within its group of M,
  ``ceil(log2 M)`` bits, packed little-endian into bytes (2:4: 2 bits per kept value, 4 per byte, first
  value in the low bits: the metadata form of the sparse tensor cores). A padded kernel-tap layout keeps
  ``min(N, real taps)`` per group; the file pads each group to N with padding positions (value 0).
* **constant fan-in** (``target`` an int k; SRigL): a bitmap of alive rows (ablated neurons keep none),
  and ``(alive, k)`` column indices (:mod:`semisparse.indices`: uint16 bits in int16, int32 when K > 65,536).
* **unstructured** (``target`` None; RigL): a bitmap of the weight, or CSR (per-row counts + column
  indices), whichever is smaller.

:func:`encode` gives a weight's header entry and its tensors (named ``KEY::values``, ``KEY::nm``, ...);
:func:`decode` validates them against the entry and gives back the :class:`~semisparse.masking.Mask` and
the weight. Nothing here touches a file (:mod:`.compressed` does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from ..errors import SemisparseError
from ..indices import U16_LIMIT, columns, store
from ..layout import Layout
from ..masking.parametrization import Mask, SparseParametrization, Target
from ..patterns import NM

#: Separates a weight's key from the name of one of its encoded tensors (``conv1.weight::values``).
SEP = "::"

#: Every dtype a file may hold, by name.
DTYPES = {
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


def pack_bool(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1), bitorder="little"))


def unpack_bool(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = np.unpackbits(packed.cpu().numpy().reshape(-1), bitorder="little")
    if flat.size < n or flat[n:].any():
        raise SemisparseError(f"bitmap of {flat.size} bits does not describe {n} entries")
    return torch.from_numpy(flat[:n].astype(bool))


def _index_tensor(cols: torch.Tensor, width: int) -> tuple[torch.Tensor, str]:
    """Column indices in the stored form and its header name (``"int16"``: uint16 bits, or ``"int32"``)."""
    t = store(cols, width)
    return t, "int16" if t.dtype == torch.int16 else "int32"


def _read_index(t: torch.Tensor, kind: str) -> torch.Tensor:
    if (kind, t.dtype) in (("int16", torch.int16), ("int32", torch.int32)):
        return columns(t)
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
    except (KeyError, TypeError, ValueError, OverflowError):
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


def encode(
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
        tensors["alive"] = pack_bool(alive)
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
        idx_bytes = 2 if view.shape[1] <= U16_LIMIT else 4
        if nnz * idx_bytes + 4 * view.shape[0] < (numel + 7) // 8:
            idx, kind = _index_tensor(
                torch.arange(view.shape[1], dtype=torch.int32).expand_as(view)[view], view.shape[1]
            )
            tensors["counts"] = view.sum(1).to(torch.int32)
            tensors["cols"] = idx
            entry |= {"encoding": "csr", "index_dtype": kind}
        else:
            tensors["bitmap"] = pack_bool(view)
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


def decode(key: str, entry: Mapping, tensors: Mapping[str, torch.Tensor]) -> tuple[Mask, torch.Tensor]:
    """The ``Mask`` parametrization and the weight to put underneath it, validated against the header."""
    try:
        layout = Layout(str(entry["layout"]), tuple(int(s) for s in entry["shape"]))
        encoding = entry["encoding"]
        dtype = DTYPES[entry["dtype"]]
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
        alive = unpack_bool(_get(tensors, key, "alive", torch.uint8), rows)
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
            view = unpack_bool(_get(tensors, key, "bitmap", torch.uint8), numel).reshape(rows, width)
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


#: The tensors each encoding stores besides ``values`` (or ``dense`` with keep_dense).
PARTS = {"nm": ("nm",), "fanin": ("alive", "cols"), "csr": ("counts", "cols"), "bitmap": ("bitmap",)}

#: A layer larger than :data:`SMALL_LAYER` weights may declare at most this many weights per entry its file
#: stores for it (values, indices, bitmap bits): a 99.9%-sparse layer stores about one in 500. Beyond, a
#: header would make a load allocate far more than its file holds (fan-in and CSR widths are not fixed by
#: the tensors).
MAX_EXPANSION = 4096
SMALL_LAYER = 1 << 24

_LAYOUTS = ("rows", "conv", "taps")


def _name_in(x: object, names) -> bool:
    return isinstance(x, str) and x in names  # a list or dict from a file is unhashable: not a name


def _positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def check_entry(key: object, entry: object, where: object) -> None:
    """One line naming what is wrong with a layer entry of the header (types and names only, no tensor)."""
    def bad(what: str) -> SemisparseError:
        return SemisparseError(f"{where}: layer {key!r}: {what} in the header")

    if not isinstance(entry, Mapping):
        raise bad(f"the entry is a {type(entry).__name__}; expected a mapping")
    if not _name_in(entry.get("encoding"), PARTS):
        raise bad(f"unknown encoding {entry.get('encoding')!r}; expected one of {sorted(PARTS)}")
    if not _name_in(entry.get("layout"), _LAYOUTS):
        raise bad(f"unknown layout {entry.get('layout')!r}; expected one of {list(_LAYOUTS)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) < 2 or not all(_positive_int(s) for s in shape):
        raise bad(f"shape {shape!r} is not a list of at least two positive ints")
    if not _name_in(entry.get("dtype"), DTYPES):
        raise bad(f"unknown dtype {entry.get('dtype')!r}")
    if not isinstance(entry.get("keep_dense"), bool):
        raise bad("keep_dense is not a bool")
    kept = entry.get("kept")
    if not (isinstance(kept, int) and not isinstance(kept, bool) and kept >= 0):
        raise bad(f"kept count {kept!r} is not a non-negative int")
    if not isinstance(entry.get("target", {}), Mapping):
        raise bad("the sparsity target is not a mapping")


def check_size(key: str, entry: Mapping, tensors: Mapping[str, torch.Tensor], where: object) -> None:
    """Refuse a layer whose declared shape is far larger than what the file stores (see :data:`MAX_EXPANSION`)."""
    numel = math.prod(entry["shape"])
    stored = 0
    for name in (*PARTS[entry["encoding"]], "dense" if entry["keep_dense"] else "values"):
        t = tensors.get(f"{key}{SEP}{name}")
        if t is not None:
            stored += t.numel() * (8 if t.dtype == torch.uint8 else 1)  # bytes of packed bits: up to 8 entries
    if numel > max(MAX_EXPANSION * stored, SMALL_LAYER):
        raise SemisparseError(
            f"{where}: layer {key!r} declares shape {tuple(entry['shape'])} ({numel} weights), more than "
            f"{MAX_EXPANSION} times the {stored} entries the file stores for it"
        )
