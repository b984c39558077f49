"""One content digest for every file semisparse writes: BLAKE2b over tensors and the plain values around them.

A training checkpoint (``torch.save`` of a dict) records ``digest(everything else)`` under ``"digest"``; a
compressed file records ``digest({"header": header without the digest, "tensors": tensors})`` in its header.
The digest is of the *contents*, not the bytes: the same tensors (dtype, shape, values) and the same plain
values give the same digest however the file lays them out, and any change to one of them a different one.

It detects accidental corruption (a flipped bit, a truncated copy, a file edited by mistake), not deliberate
tampering: whoever edits a file on purpose can recompute the digest. Nothing here makes an untrusted file
safe to *use*; the readers' checks (``weights_only=True``, shapes against the model, indices in range) do
that, with or without a digest.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping

import torch

from ..errors import SemisparseError, UnverifiedFileWarning

#: Key of the digest in a training checkpoint's dict (and in a compressed file's header).
KEY = "digest"
#: Prefix naming the algorithm, so another one can be added without ambiguity.
ALGORITHM = "blake2b-256"


def digest(obj: object) -> str:
    """``"blake2b-256:<hex>"`` of ``obj``: nested dicts / lists / tuples of tensors, numbers, strings, None."""
    h = hashlib.blake2b(digest_size=32)
    _feed(h, obj)
    return f"{ALGORITHM}:{h.hexdigest()}"


def _scalar(x: object) -> bytes | None:
    """The canonical bytes of a plain scalar (None when ``x`` is not one)."""
    if x is None:
        return b"N"
    if isinstance(x, bool):
        return b"T" if x else b"F"
    if isinstance(x, int):
        return b"i%d;" % x
    if isinstance(x, float):
        return b"f" + x.hex().encode() + b";"
    if isinstance(x, str):
        s = x.encode("utf-8", "surrogatepass")
        return b"s%d:" % len(s) + s
    if isinstance(x, bytes):
        return b"b%d:" % len(x) + x
    return None


def _feed(h, obj: object) -> None:
    s = _scalar(obj)
    if s is not None:
        h.update(s)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        h.update(b"x" + f"{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    elif isinstance(obj, Mapping):
        items = []
        for k, v in obj.items():
            kb = _scalar(k)
            items.append((kb if kb is not None else b"o" + repr(k).encode(), v))
        items.sort(key=lambda kv: kv[0])
        h.update(b"d%d;" % len(items))
        for kb, v in items:
            h.update(kb)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update((b"l%d;" if isinstance(obj, list) else b"t%d;") % len(obj))
        for v in obj:
            _feed(h, v)
    else:  # torch.dtype, torch.device, ...: what weights_only lets through beside the above
        h.update(b"o" + f"{type(obj).__qualname__}|{obj!r}".encode() + b";")


def seal(ckpt: Mapping) -> dict:
    """``ckpt`` with its digest recorded under :data:`KEY` (a new dict; ``ckpt`` is not changed)."""
    body = {k: v for k, v in ckpt.items() if k != KEY}
    return {**body, KEY: digest(body)}


def verify(obj: Mapping, where: object, what: str = "checkpoint") -> bool:
    """Check the digest a file recorded (``obj[KEY]``) against its contents.

    Returns True when it matches; False, after one :class:`~semisparse.UnverifiedFileWarning` line, when the
    file records none (written by an older semisparse, or not by semisparse: torchvision weights). A
    mismatch raises :class:`~semisparse.SemisparseError`.
    """
    recorded = obj.get(KEY)
    if recorded is None:
        unverified(where, what)
        return False
    body = {k: v for k, v in obj.items() if k != KEY}
    if not isinstance(recorded, str) or recorded != digest(body):
        raise corrupted(where, what)
    return True


def corrupted(where: object, what: str = "checkpoint") -> SemisparseError:
    """The one-line error of a file whose contents differ from the digest recorded when it was written."""
    return SemisparseError(
        f"{what} {where} is corrupted: its contents do not match the digest recorded when it was written "
        "(use another copy)"
    )


def unverified(where: object, what: str = "checkpoint") -> None:
    """The one-line note of a file without a digest: it loads, unchecked for corruption."""
    warnings.warn(
        f"{what} {where} records no digest (written by an older semisparse, or not by semisparse): "
        "it is loaded without a corruption check",
        UnverifiedFileWarning,
        stacklevel=3,
    )
