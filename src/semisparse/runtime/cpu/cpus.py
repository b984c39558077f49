"""How many CPUs this process may use now, and keeping thread pools no larger than that.

A deployed model is planned with torch's thread count, but the CPUs a process may use change under it: a
container's CPU set, ``taskset``, a cgroup CPU quota, other processes busy on the same CPUs. OpenMP threads
beyond the CPUs the process has then spin-wait at every barrier for a sibling that cannot run: a 25 us
batch-1 layer took ~8 ms pinned to one of two CPUs, a dense ResNet-18 650 ms instead of 7, and ~25 ms on two
CPUs shared with a dozen busy processes. :func:`threads_now` is the kernels' thread count (torch's intra-op
count, at most :func:`usable`; they share torch's libgomp), and a deployed model's hooks (:func:`attach`)
hold torch's own count there for the length of each call, so its torch ops do not spin either. All of it is
cheap enough for every call (where OpenMP binds threads, its places stand for the affinity: it pins the
initial thread to one CPU): the affinity is re-read at most every 10 ms (a system call, ~2 us), the CPU
time others took on those CPUs every 100 ms (``/proc/stat``), the cgroup quota every second (a few files).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from . import batches

__all__ = ["usable", "refresh", "threads_now", "fitted_threads", "attach", "affinity_set", "openmp_places"]

AFFINITY_EVERY_S = 0.01
LOAD_EVERY_S = 0.1
MIN_WINDOW_S = 0.05
QUOTA_EVERY_S = 1.0
#: A CPU counts as free for a thread when others used less than this share of it (CFS then hands our thread
#: the CPU within a few hundred microseconds): below it, one more thread is worth its risk of waiting.
FREE_MARGIN = 0.25

_cache: dict = {"affinity": os.cpu_count() or 1, "cpus": None, "affinity_at": -1.0, "quota": None,
                "quota_at": -1.0, "free": None, "load_at": -1.0, "sample": None, "usable": 1, "next_at": -1.0}
_TICK_S = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
_local = threading.local()


def affinity_set() -> frozenset[int] | None:
    """The CPUs this process's threads may run on: OpenMP's places where OpenMP binds its threads
    (:func:`openmp_places`), else the calling thread's affinity (``sched_getaffinity``); None where the system
    does not say."""
    places = openmp_places()
    if places:
        return places
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


#: Shared-library names of the OpenMP runtimes torch is built with (GNU, Intel, LLVM).
_OPENMP_LIBS = ("libgomp.so.1", "libiomp5.so", "libomp.so", "libomp.so.5")


@functools.lru_cache(maxsize=1)
def openmp_places() -> frozenset[int] | None:
    """The CPUs of OpenMP's places when the process's OpenMP runtime binds threads to them (``OMP_PROC_BIND``,
    ``OMP_PLACES``, ``GOMP_CPU_AFFINITY``); None when it does not, or no loaded runtime answers.

    A binding runtime pins the initial thread to the first place as it loads (with torch), so from then on that
    thread's own affinity says one CPU: sized by it, every call would run one thread. The places, computed from
    the affinity the process started with, are the CPUs its threads will use. Read once: binding is fixed when
    the runtime starts."""
    if not hasattr(os, "RTLD_NOLOAD"):
        return None
    for name in _OPENMP_LIBS:
        try:
            omp = ctypes.CDLL(name, mode=os.RTLD_NOLOAD)  # only a runtime already loaded (torch's)
            if omp.omp_get_proc_bind() == 0:  # omp_proc_bind_false: threads float, the affinity is the truth
                return None
            cpus: set[int] = set()
            for place in range(omp.omp_get_num_places()):
                ids = (ctypes.c_int * omp.omp_get_place_num_procs(place))()
                omp.omp_get_place_proc_ids(place, ids)
                cpus.update(ids)
        except (OSError, AttributeError):
            continue
        # Places are what the user listed (GOMP_CPU_AFFINITY=0-1023 names CPUs that do not exist): keep those
        # online and in the cgroup's CPU set.
        for allowed in (cpu_list(_read("/sys/devices/system/cpu/online")), cgroup_cpuset()):
            if allowed:
                cpus &= allowed
        return frozenset(cpus) or None
    return None


def cpu_list(text: str | None) -> set[int] | None:
    """The CPUs of a kernel CPU list such as ``0-3,8,10-11``; None for no text or text that is not one."""
    if not text or not text.strip():
        return None
    cpus: set[int] = set()
    try:
        for part in text.strip().split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        return None
    return cpus


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def cgroups(proc_cgroup: str | None = None) -> list[tuple[str, list[str], str]]:
    """``(hierarchy id, controllers, path)`` of each line of ``/proc/self/cgroup`` (or of the text given); v2's
    unified line is ``("0", [], path)``. Empty where the file cannot be read."""
    text = _read("/proc/self/cgroup") if proc_cgroup is None else proc_cgroup
    out = []
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[0], [c for c in parts[1].split(",") if c], parts[2]))
    return out


def cgroup_cpuset(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: str | None = None) -> set[int] | None:
    """The CPUs this process's cgroup allows (v2 ``cpuset.cpus.effective``, v1 ``cpuset.effective_cpus``);
    None where no cpuset controller says."""
    for hierarchy, controllers, path in cgroups(proc_cgroup):
        rel = path.lstrip("/")
        if hierarchy == "0" and not controllers:
            got = cpu_list(_read(root / rel / "cpuset.cpus.effective"))
        elif "cpuset" in controllers:
            got = cpu_list(_read(root / "cpuset" / rel / "cpuset.effective_cpus")) or \
                cpu_list(_read(root / "cpuset" / rel / "cpuset.cpus"))
        else:
            continue
        if got:
            return got
    return None


def busy_seconds(stat: str, cpus: frozenset[int]) -> float:
    """CPU seconds ``cpus`` spent on anything but idle and I/O wait, from the text of ``/proc/stat``."""
    ticks = 0
    for line in stat.splitlines():
        if not line.startswith("cpu"):
            break
        name, *fields = line.split()
        if name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields]
        ticks += sum(values[:8]) - values[3] - values[4]  # user..steal, minus idle and iowait
    return ticks * _TICK_S


def _read_stat() -> str | None:
    try:
        with open("/proc/stat") as fh:
            return fh.read(16384)
    except OSError:
        return None


def free_cpus(cpus: frozenset[int], now: float) -> float | None:
    """Of ``cpus``, how many others (other processes) left free since the last sample: ``len(cpus)`` minus the
    CPU seconds per second they took (our own process's CPU time excluded, its spinning threads included);
    None until two samples at least ``MIN_WINDOW_S`` apart exist, or without ``/proc/stat``."""
    prev = _cache["sample"]
    if prev is not None and prev[1] == cpus and now - prev[0] < MIN_WINDOW_S:
        return None  # /proc/stat counts 10 ms ticks: a shorter window says nothing yet
    stat = _read_stat()
    if stat is None:
        return None
    sample = _cache["sample"] = (now, cpus, busy_seconds(stat, cpus), time.process_time())
    if prev is None or prev[1] != cpus:
        return None
    others = (sample[2] - prev[2]) - (sample[3] - prev[3])
    return len(cpus) - max(0.0, others) / (now - prev[0])


def quota_cpus(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: str | None = None) -> int | None:
    """Whole CPUs the cgroup CPU quota allows (the tightest of this cgroup and its parents; v2 ``cpu.max`` or
    v1 ``cpu.cfs_quota_us``), at least 1; None without a quota. A fraction is rounded down: a thread more
    than the quota pays for is stopped until the next period (100 ms by default), far worse than one less.
    ``proc_cgroup``: the text of ``/proc/self/cgroup`` (read when None)."""
    limits = []
    for hierarchy, controllers, path in cgroups(proc_cgroup):
        if hierarchy == "0" and not controllers:
            dirs, read = [root], _v2_quota
        elif "cpu" in controllers:
            dirs, read = [root / "cpu,cpuacct", root / "cpuacct,cpu", root / "cpu"], _v1_quota
        else:
            continue
        for base in dirs:
            here = base / path.lstrip("/")
            while True:
                q = read(here)
                if q is not None:
                    limits.append(q)
                if here == base or base not in here.parents:
                    break
                here = here.parent
    return max(1, math.floor(min(limits))) if limits else None


def _v2_quota(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def refresh() -> None:
    """Forget every reading: the next :func:`usable` reads affinity, quota and load again (for callers that
    just moved the process and cannot wait ``AFFINITY_EVERY_S``)."""
    for key in ("affinity_at", "quota_at", "load_at", "next_at"):
        _cache[key] = -1.0


def usable() -> int:
    """CPUs this process may use now: its affinity, capped by its cgroup quota and by the CPUs other processes
    leave free (each re-read when stale); at least 1."""
    now = time.monotonic()
    c = _cache
    if now < c["next_at"]:  # nothing is due: the answer of the last look
        return c["usable"]
    if now >= c["affinity_at"]:
        cpus = affinity_set()
        c["cpus"], c["affinity"] = cpus, len(cpus) if cpus else os.cpu_count() or 1
        c["affinity_at"] = now + AFFINITY_EVERY_S
    if now >= c["quota_at"]:
        c["quota"], c["quota_at"] = quota_cpus(), now + QUOTA_EVERY_S
    if now >= c["load_at"] and c["cpus"]:
        free = free_cpus(c["cpus"], now)
        if free is not None or c["sample"] is None or c["sample"][1] != c["cpus"]:
            c["free"], c["load_at"] = free, now + LOAD_EVERY_S
        else:  # the first window is still too short: look again soon
            c["load_at"] = now + MIN_WINDOW_S / 4
    n = c["affinity"]
    if c["quota"] is not None:
        n = min(n, c["quota"])
    if c["free"] is not None:
        n = min(n, math.floor(c["free"] + FREE_MARGIN))
    c["usable"] = n = max(1, n)
    c["next_at"] = min(c["affinity_at"], c["quota_at"], c["load_at"] if c["cpus"] else math.inf)
    return n


def threads_now() -> int:
    """Threads for work started now in this Python thread: torch's intra-op count, at most :func:`usable`."""
    return max(1, min(torch.get_num_threads(), usable()))


@contextlib.contextmanager
def fitted_threads() -> Iterator[int]:
    """Run the block with torch's intra-op threads (this Python thread) at :func:`threads_now`, restored after."""
    base = torch.get_num_threads()
    n = max(1, min(base, usable()))
    if n != base:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != base:
            torch.set_num_threads(base)


def _enter(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: torch's threads down to what the process may use, for this call (a microsecond or
    less when nothing changes: one batch-1 layer call is 25)."""
    base = torch.get_num_threads()
    n = usable()
    stack = _local.__dict__.get("bases")
    if stack is None:
        stack = _local.bases = []
    if n < base:
        torch.set_num_threads(n)
        stack.append(base)
    else:
        stack.append(0)


def _leave(module: nn.Module, args: tuple, output: object) -> None:
    """Forward hook (run on errors too): torch's threads back to what they were before the call."""
    stack = _local.__dict__.get("bases")
    if stack:
        base = stack.pop()
        if base:
            torch.set_num_threads(base)


def script_copy(model: nn.Module) -> nn.Module:
    """What ``torch.jit.script`` compiles of a deployed model (its ``__prepare_scriptable__``): a copy without
    the thread hooks, which are Python that TorchScript cannot compile (the scripted model runs torch's own
    thread count). A copy, because preparing for TorchScript replaces submodules in place (condensed layers by
    torch's own): the deployed model is left as it is."""
    twin = copy.deepcopy(model)
    twin.__dict__.pop("__prepare_scriptable__", None)
    batches.uninstall(twin)  # the per-sample loop is Python too: the scripted model takes whole batches
    for table in (twin._forward_pre_hooks, twin._forward_hooks):
        for key in [k for k, fn in table.items() if fn in (_enter, _leave)]:
            del table[key]
            twin._forward_hooks_always_called.pop(key, None)
    own = getattr(type(twin), "__prepare_scriptable__", None)  # a root that is itself a deployed layer
    return own(twin) if own is not None else twin


def scriptable(model: nn.Module) -> None:
    """Let ``torch.jit.script(model)`` compile a copy without the thread hooks (:func:`script_copy`)."""
    model.__dict__["__prepare_scriptable__"] = functools.partial(script_copy, model)


def attach(model: nn.Module) -> list:
    """Make every call of ``model`` run its torch ops, not only its kernels, on the CPUs the process has then
    (and leave torch's thread count as it was after the call): a forward pre-hook and a forward hook, PyTorch's
    own way to run code around a module's call without touching its class."""
    handles = [model.register_forward_pre_hook(_enter), model.register_forward_hook(_leave, always_call=True)]
    usable()  # the first sample of other processes' CPU time: the first calls then have a window to compare
    return handles
