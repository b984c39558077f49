"""The output folder of a training run: one run per folder, and no file of the previous run lost before
the new run has a checkpoint.

:func:`claim_output_dir` runs before anything is built. A folder holding another run's files
(``checkpoint.pth``, ``model_<N>.pth``, ``metrics.jsonl``) is refused unless ``--resume`` continues a
checkpoint of that folder or ``overwrite`` (``--overwrite``) replaces the run. Replacing waits for the
commit: :meth:`RunFolder.save` writes the new run's first ``checkpoint.pth``, and only then removes the
old run's ``model_<N>.pth``, ``metrics.jsonl`` and TensorBoard events (``MetricsLog`` then starts a new
history). A run that fails or is killed before that leaves the old files byte for byte as they were.

One run at a time: the run that claims a folder holds an exclusive ``fcntl.flock`` on ``.semisparse.lock``
in it (the file holds its pid) from before its first write until it exits; the kernel drops the lock when
the process ends however it ends, so the lock of a killed run never blocks the next one. A second run into
the folder is refused in one line naming the first one's pid. The lock file is removed when its run exits
normally (a killed run's stays, unlocked and harmless).

Temporary files of a save killed before its rename (``.checkpoint.pth.<pid>.<random>.tmp`` from
:func:`semisparse.io.files.atomic_write`, ``metrics.jsonl.tmp<pid>``) are removed when a run claims the
folder, unless their process still lives.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import tempfile
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import SemisparseError
from ..io.digest import seal
from ..io.files import TEMP_NAME
from .checkpoint import atomic_save

RUN_FILE = re.compile(r"(checkpoint\.pth|metrics\.jsonl|model_\d+\.pth)")
# MetricsLog's "metrics.jsonl.tmp<pid>" (and the ".<name>.tmp<pid>" of earlier versions' saves)
OLD_TEMP_FILE = re.compile(r"(\.checkpoint\.pth|\.model_\d+\.pth|metrics\.jsonl)\.tmp(\d+)")
TENSORBOARD_EVENTS = re.compile(r"events\.out\.tfevents\..*")


def run_files(output_dir: str) -> list[str]:
    """Names of the run files (checkpoints and metrics) in ``output_dir``, sorted; [] if it does not exist."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if RUN_FILE.fullmatch(n))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's live process (or a pid this machine cannot hold): leave its file
    return True


def remove_temp_files(output_dir: str) -> list[str]:
    """Remove the temporary files of saves killed before their rename; returns their names.

    A file whose process is still running (another run writing into the same folder) is kept.
    """
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        m = TEMP_NAME.fullmatch(name)  # atomic_write's ".<name>.<pid>.<random>.tmp"
        if m and not RUN_FILE.fullmatch(m.group(1)):
            m = None
        m = m or OLD_TEMP_FILE.fullmatch(name)
        if m and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
            os.remove(os.path.join(output_dir, name))
            removed.append(name)
    return removed


LOCK_NAME = ".semisparse.lock"


class OutputDirLock:
    """An exclusive ``flock`` on ``<folder>/.semisparse.lock``, held until :meth:`release` or process exit."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd: int | None = None
        deadline = time.monotonic() + 1.0
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                why = exc.strerror or exc
                raise SemisparseError(f"cannot lock --output-dir {folder}: {self.path}: {why}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = _read_pid(self.path)
                if holder is None and time.monotonic() < deadline:  # it has the lock but not written its pid yet
                    time.sleep(0.05)
                    continue
                who = f"pid {holder}" if holder is not None else "a process that has not written its pid"
                raise SemisparseError(
                    f"--output-dir {folder} is in use by another run ({who}, holding {self.path}); one run writes "
                    "into a folder at a time: wait for it to finish or choose another --output-dir"
                ) from None
            # the file may have been removed (and another created) by the holder's release between open and flock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        _HELD.add(self)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order: a waiting run then locks a new file)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


#: Locks this process holds. A forked child (a DataLoader worker) shares the lock's open file, which would keep
#: the folder locked after this process died while the child lingers: the child closes its copy at once.
_HELD: weakref.WeakSet[OutputDirLock] = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    for lock in list(_HELD):
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None  # the child never removes the parent's lock file
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def check_writable(folder: str) -> None:
    """Refuse, in one line, an existing ``folder`` in which this process cannot create a file (a read-only
    folder or mount, another user's folder), before any work is done; a missing one is left to be created."""
    if not os.path.isdir(folder):
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".semisparse-probe.", dir=folder)
    except OSError as exc:
        raise SemisparseError(
            f"--output-dir {folder} is not writable ({exc.strerror or exc}); choose another --output-dir"
        ) from None
    os.close(fd)
    os.unlink(probe)


def same_dir(a: str, b: str) -> bool:
    """True when the paths name one folder (symlinks resolved)."""
    return os.path.realpath(a) == os.path.realpath(b)


@dataclass
class RunFolder:
    """Where one run writes its checkpoints; ``stale`` are the files of the run it replaces (``--overwrite``),
    removed once this run's first ``checkpoint.pth`` is written."""

    path: str
    stale: list[str] = field(default_factory=list)  # paths relative to ``path``
    committed: bool = False
    lock: OutputDirLock | None = None
    created: bool = False  # the folder did not exist before this run

    def release(self) -> None:
        """Give the folder up (at the end of the run): drop the lock; remove the folder if this run created it
        and wrote nothing."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.created:
            try:
                os.rmdir(self.path)  # only when empty
            except OSError:
                pass

    @property
    def replaces_a_run(self) -> bool:
        """True when the folder held another run: its metrics history is not continued."""
        return bool(self.stale)

    def save(self, ckpt: Mapping, epoch: int) -> None:
        """Write ``model_{epoch}.pth`` and ``checkpoint.pth`` atomically.

        The usual order is ``model_{epoch}.pth`` first (a kill between the two leaves ``checkpoint.pth`` at
        the previous epoch, and resuming redoes this one). The first save of a run that replaces another
        writes ``checkpoint.pth`` first: that rename is the commit before which no old file is touched.
        """
        model_path = os.path.join(self.path, f"model_{epoch}.pth")
        ckpt = seal(ckpt)  # one digest for both files
        if self.committed or not self.stale:
            atomic_save(ckpt, model_path)
            atomic_save(ckpt, os.path.join(self.path, "checkpoint.pth"))
            self.committed = True
            return
        atomic_save(ckpt, os.path.join(self.path, "checkpoint.pth"))
        self.committed = True
        for name in self.stale:
            if name != "checkpoint.pth":
                try:
                    os.remove(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass
        self.stale = []
        atomic_save(ckpt, model_path)


def claim_output_dir(output_dir: str, *, resume: str | None = None, overwrite: bool = False,
                     clean: bool = True) -> RunFolder:  # fmt: skip
    """The :class:`RunFolder` of a run about to write into ``output_dir`` (nothing of another run is touched).

    Refuses, in one line, a folder holding another run's checkpoints or metrics unless ``resume`` is a
    checkpoint in that folder (the run continues) or ``overwrite`` is set. With ``clean`` (only the process
    that writes should: rank 0) the folder is created, checked writable (:func:`check_writable`) and locked
    (:class:`OutputDirLock`: another live run's folder is refused) before anything else, and temporary files
    left by killed saves are removed. Call :meth:`RunFolder.release` when the run ends.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SemisparseError(f"--output-dir {output_dir} is a file; expected a folder (it is created if missing)")
    lock, created = None, False
    if clean:  # the process that writes (rank 0) holds the folder from before its first write until it exits
        created = not os.path.isdir(output_dir)
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as exc:
            raise SemisparseError(f"cannot create --output-dir {output_dir}: {exc.strerror or exc}") from None
        try:
            check_writable(output_dir)
            lock = OutputDirLock(output_dir)
        except BaseException:
            RunFolder(output_dir, created=created).release()
            raise
    folder = RunFolder(output_dir, lock=lock, created=created)
    try:
        _check_previous_run(folder, resume, overwrite, clean)
    except BaseException:
        folder.release()
        raise
    return folder


def _check_previous_run(folder: RunFolder, resume: str | None, overwrite: bool, clean: bool) -> None:
    output_dir = folder.path
    if clean:
        remove_temp_files(output_dir)
    found = run_files(output_dir)
    if not found or (resume and same_dir(os.path.dirname(os.path.abspath(resume)), output_dir)):
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        other = f", not the run of --resume {resume}" if resume else ""
        hint = f"--resume {os.path.join(output_dir, 'checkpoint.pth')}" if "checkpoint.pth" in found else "--resume"
        raise SemisparseError(
            f"--output-dir {output_dir} holds another run's files ({shown}){other}: continue it with {hint}, "
            "replace it with --overwrite (its files are removed once this run's first checkpoint is written), "
            "or choose another --output-dir"
        )
    stale = list(found)
    tb = os.path.join(output_dir, "tensorboard")
    if os.path.isdir(tb):
        stale += sorted(os.path.join("tensorboard", n) for n in os.listdir(tb) if TENSORBOARD_EVENTS.fullmatch(n))
    folder.stale = stale
