"""Run a function on N real gloo processes (CPU), set up and torn down as ``torchrun`` + semisparse do.

Every DDP test that spawns its own ranks goes through ``run_ranks``: each process gets torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joins the group with semisparse's own
``init_distributed`` (a ``file://`` rendezvous in the test's tmp_path), runs ``fn(rank, world, *args)``,
and leaves with semisparse's own ``cleanup`` (barrier, then destroy). After a rank's ``fn`` returned, its
process group must be gone, its gloo threads joined: a group that outlives ``cleanup`` keeps worker threads
that can still be releasing the last gradient all-reduce when the interpreter exits, and that aborts the
process ("terminate called without an active exception", SIGABRT) by chance, under load. ``run_ranks``
checks that precondition in every rank, so a regression fails every time instead of now and then.
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semisparse.train import distributed


def run_ranks(fn: Callable[..., None], world: int, tmp_path: Path, *args) -> None:
    """``fn(rank, world, *args)`` in ``world`` fresh processes joined in one gloo group; raises if any fails.

    ``fn`` must be a module-level function (the processes are spawned, not forked).
    """
    mp.spawn(_rank_main, args=(fn, world, str(tmp_path / "gloo_init"), args), nprocs=world, join=True)


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (torch names them ``pt_gloo_*`` and ``gloo_*``; Linux only)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return [n for n in names if "gloo" in n]


def _rank_main(rank: int, fn: Callable[..., None], world: int, init_file: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = distributed.init_distributed("cpu", f"file://{init_file}")
    assert info.rank == rank and info.world_size == world
    group = weakref.ref(dist.group.WORLD)
    try:
        fn(rank, world, *args)
    finally:
        distributed.cleanup()
    gc.collect()  # what fn built (a DDP wrapper) is gone now, cycles included
    assert group() is None, ("the process group outlived cleanup(): something still holds it, so its gloo "
                             "threads would still run when the interpreter exits")
    assert not gloo_threads(), f"gloo threads outlived cleanup(): {gloo_threads()}"
