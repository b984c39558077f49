"""Writing and reading files safely: one atomic write, one checked ``torch.load``.

Every file semisparse writes (training checkpoints, compressed checkpoints) goes through
:func:`atomic_write`, so a crash or a failing run never leaves a half-written or overwritten file; every
``torch.save`` file it reads goes through :func:`load_torch` (``weights_only=True``: tensors and plain
containers, never arbitrary pickled code).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import SemisparseError


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, flush it to disk, then ``os.replace`` it over ``path``.

    The folder is created if needed; the temporary file is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_torch(path: str | os.PathLike, what: str = "checkpoint") -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)``, or a one-line error naming ``what``.

    A missing file raises ``FileNotFoundError``; an unreadable one :class:`~semisparse.SemisparseError`
    ("cannot read <what> <path>: corrupted or not a torch checkpoint (<reason>)").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and weights_only errors have no common base
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SemisparseError(
            f"cannot read {what} {path}: corrupted or not a torch checkpoint ({reason})"
        ) from None
