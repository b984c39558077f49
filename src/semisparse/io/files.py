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
import stat
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..errors import SemisparseError


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, flush it to disk, then ``os.replace`` it over ``path``.

    The folder is created if needed; the temporary file is removed if ``write`` fails, and the old file is
    then kept as it was. Only a regular file is ever replaced: a ``path`` that exists as anything else (a
    folder, a device such as ``/dev/null``, a FIFO, a socket, or a symlink, even one to a regular file) is
    refused in one line, since the rename would put a file in its place. The new file has the mode an
    ordinary write gives (``0o666`` less the umask), or the mode of the file it replaces. A failing write
    (a full disk, a file-size limit) is one :class:`~semisparse.SemisparseError` line naming ``path``.

    The temporary name, ``.<name>.<pid>.<random>.tmp``, carries the writer's process id so a later run can
    tell the partial file of a killed save (removed) from one a live process is still writing (kept): see
    :data:`TEMP_NAME`.
    """
    path = Path(path)
    check_write_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise SemisparseError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode(path))  # after write: a writer may replace the file (safetensors does)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        check_write_target(path)  # again: it may have been replaced while the file was written
        os.replace(tmp, path)
    except Exception as exc:  # torch's and safetensors' writers raise their own types for a failed write
        if not (isinstance(exc, OSError) or _is_write_failure(exc)):
            raise
        raise SemisparseError(f"cannot write {path}: {_write_failure(exc, path)}; nothing was replaced") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def check_write_target(path: str | os.PathLike) -> None:
    """Refuse, in one line, a ``path`` that exists and is not a regular file (a symlink is refused too)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SemisparseError(f"cannot write {path}: {exc.strerror or exc}") from None
    if stat.S_ISREG(st.st_mode):
        return
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
    hint = f" (to {os.readlink(path)})" if stat.S_ISLNK(st.st_mode) else ""
    raise SemisparseError(
        f"cannot write {path}: it is {kind}{hint}; semisparse replaces only regular files: give the path of a "
        "new or regular file"
    )


_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
}


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, which is not thread-safe)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _new_file_mode(path: Path) -> int:
    """The mode of the file ``path`` replaces, or an ordinary new file's (``0o666`` less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _is_write_failure(exc: Exception) -> bool:
    text = str(exc)
    return any(s in text for s in ("inline_container", "file write failed", "No space left", "I/O error"))


def _write_failure(exc: BaseException, path: Path) -> str:
    """What went wrong in a failed write, in words (torch's stream writer names neither file nor cause)."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        if "inline_container" in reason:  # torch's stream writer: "[enforce fail at ...] . unexpected pos 896 vs 790"
            detail = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", reason)
            reason = f"it could not be written in full (a full disk, a quota or a file-size limit; torch: {detail})"
        found = re.search(r"I/O error: (.*?) \(os error \d+\)", reason)  # safetensors'
        reason = found.group(1) if found else reason
    try:
        free = os.statvfs(path.parent)
        if free.f_bavail * free.f_frsize < 1 << 20:
            reason += f" (the disk holding {path.parent} is full: {free.f_bavail * free.f_frsize} bytes free)"
    except OSError:
        pass
    return reason


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
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and weights_only errors have no common base
        unsafe = _unpickle_reason(str(exc))
        if unsafe is not None:
            raise SemisparseError(f"cannot read {what} {path}: {unsafe}") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SemisparseError(
            f"cannot read {what} {path}: corrupted or not a torch checkpoint ({reason})"
        ) from None
    check_depth(obj, f"{what} {path}")
    return obj


#: How deeply a file's values may nest (a checkpoint nests about 6 levels; the readers recurse).
MAX_DEPTH = 64


def check_depth(obj: object, where: str, limit: int = MAX_DEPTH) -> None:
    """Refuse, in one line, dicts / lists nested more than ``limit`` deep (which would exhaust the recursion of
    every reader after this one); iterative, so any depth is measured safely."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, Mapping):
            children = x.values()
        elif isinstance(x, (list, tuple)):
            children = x
        else:
            continue
        if depth > limit:
            raise SemisparseError(f"{where} nests values more than {limit} levels deep; semisparse writes no such file")
        stack.extend((c, depth + 1) for c in children)


def check_file(path: Path, what: str) -> None:
    """A missing path raises ``FileNotFoundError``, a folder :class:`~semisparse.SemisparseError` (one line)."""
    if path.is_dir():
        raise SemisparseError(f"{what} {path} is a folder; expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
