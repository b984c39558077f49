"""How many CPUs this process may use now, and keeping thread pools no larger than that.

A deployed model is planned with torch's thread count, but the CPUs a process may use change under it: a
container's CPU set, ``taskset``, a cgroup CPU quota. OpenMP threads beyond the CPUs the process has then
spin-wait at every barrier for a sibling that cannot run: a 25 us batch-1 layer took ~8 ms pinned to one of
two CPUs, a dense ResNet-18 650 ms instead of 7. :func:`fit_threads` keeps the calling Python thread's pool
(torch's intra-op threads and the kernels', which share torch's libgomp) at no more than :func:`usable`,
and gives back the count it had once the CPUs return. Both are cheap enough for every call: the affinity is
re-read at most every 10 ms (a system call, ~2 us), the cgroup quota every second (a few files).
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["usable", "fit_threads", "fit_threads_hook"]

AFFINITY_EVERY_S = 0.01
QUOTA_EVERY_S = 1.0

_cache = {"affinity": os.cpu_count() or 1, "affinity_at": -1.0, "quota": None, "quota_at": -1.0}
_local = threading.local()


def affinity_cpus() -> int:
    """CPUs the calling thread may run on (``sched_getaffinity``; the CPU count where that is missing)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def quota_cpus(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Whole CPUs the cgroup CPU quota allows (the tightest of this cgroup and its parents; v2 ``cpu.max`` or
    v1 ``cpu.cfs_quota_us``), at least 1; None without a quota. A fraction is rounded down: a thread more
    than the quota pays for is stopped until the next period (100 ms by default), far worse than one less."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            dirs, read = [root], _v2_quota
        elif "cpu" in controllers.split(","):
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


def usable() -> int:
    """CPUs this process may use now: its affinity, capped by its cgroup quota (re-read when stale)."""
    now = time.monotonic()
    c = _cache
    if now >= c["affinity_at"]:
        c["affinity"], c["affinity_at"] = affinity_cpus(), now + AFFINITY_EVERY_S
    if now >= c["quota_at"]:
        c["quota"], c["quota_at"] = quota_cpus(), now + QUOTA_EVERY_S
    q = c["quota"]
    return c["affinity"] if q is None else min(c["affinity"], q)


def fit_threads() -> int:
    """Set torch's intra-op thread count in this Python thread to ``min(its own count, usable())``; returns it.

    "Its own count" is what torch had before this lowered it (a count set by ``torch.set_num_threads`` since
    is taken as the new one), so the pool grows back when CPUs return.
    """
    cur = torch.get_num_threads()
    st = _local
    if cur != getattr(st, "applied", None):  # torch's default, or a count the user set: the one to keep
        st.base = cur
    n = max(1, min(st.base, usable()))
    if n != cur:
        torch.set_num_threads(n)
    st.applied = n
    return n


def fit_threads_hook(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a deployed model: its torch ops, not only its kernels, run on the CPUs it has."""
    fit_threads()
