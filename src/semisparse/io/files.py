"""Writing and reading files safely: one atomic write, one checked ``torch.load``.

Every file semisparse writes (training checkpoints, compressed checkpoints) goes through
:func:`atomic_write`, so a crash or a failing run never leaves a half-written or overwritten file; every
``torch.save`` file it reads goes through :func:`load_torch` (``weights_only=True``: tensors and plain
containers, never arbitrary pickled code).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import SemisparseError


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, flush it to disk, then ``os.replace`` it over ``path``.

    The folder is created if needed; the temporary file is removed if ``write`` fails. Its name,
    ``.<name>.<pid>.<random>.tmp``, carries the writer's process id so a later run can tell the partial file
    of a killed save (removed) from one a live process is still writing (kept): see :data:`TEMP_NAME`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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


def write_json(path: str | os.PathLike, obj: object, indent: int | None = None) -> Path:
    """``obj`` as JSON at ``path``, atomically (:func:`atomic_write`): a reader never sees half a file, and a
    failed write (an object JSON cannot hold) leaves the old file as it was."""
    text = json.dumps(obj, indent=indent)  # before any file is touched

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    return atomic_write(path, write)


#: The temporary names :func:`atomic_write` gives (groups: the target's name, the writer's pid).
TEMP_NAME = re.compile(r"\.(.+)\.(\d+)\.\w+\.tmp")


def is_safetensors(path: str | os.PathLike) -> bool:
    """True when ``path`` starts as a safetensors file does (8-byte header length, then JSON)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _unpickle_reason(message: str) -> str | None:
    """What a ``weights_only`` refusal found, without torch's advice (never load such a file unsafely)."""
    if "Weights only load failed" not in message:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"Unsupported (operand \d+)", message)
    what = found.group(1) if found else "objects semisparse does not read"
    return (
        f"it holds pickled objects other than tensors and plain containers ({what}); semisparse reads only "
        "tensors, numbers, strings, lists and dicts and never runs pickled code"
    )


def load_torch(path: str | os.PathLike, what: str = "checkpoint") -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)``, or a one-line error naming ``what``.

    A missing file raises ``FileNotFoundError``; an unreadable one :class:`~semisparse.SemisparseError`
    ("cannot read <what> <path>: corrupted or not a torch checkpoint (<reason>)").
    """
    path = Path(path)
    check_file(path, what)
    try:
        with warnings.catch_warnings():  # torch's two-line note on the pickle protocol says nothing to a user
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and weights_only errors have no common base
        unsafe = _unpickle_reason(str(exc))
        if unsafe is not None:
            raise SemisparseError(f"cannot read {what} {path}: {unsafe}") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SemisparseError(
            f"cannot read {what} {path}: corrupted or not a torch checkpoint ({reason})"
        ) from None


def check_file(path: Path, what: str) -> None:
    """A missing path raises ``FileNotFoundError``, a folder :class:`~semisparse.SemisparseError` (one line)."""
    if path.is_dir():
        raise SemisparseError(f"{what} {path} is a folder; expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
