"""Distributed set-up for ``torchrun --nproc-per-node N -m semisparse train``: NCCL on GPU, gloo on CPU.

``init_distributed`` reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without them the run is
one process. Only rank 0 logs and writes files (``is_main()``). Sums over ranks go through
``all_reduce_sum``. ``ShardSampler`` gives every rank its share of one per-epoch permutation, so a run on
N processes with batch B sees the same global batches as one process with batch N*B.

A finished run must also *exit* cleanly (a scheduler reports a run that aborts at exit as failed), which
takes two things: the process group must really be freed at ``cleanup()`` (see ``init_distributed``), and
no rank may tear down while a peer still talks to it (``cleanup`` meets the others at a barrier first).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..errors import SemisparseError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str, dist_url: str = "env://", world_size: int | None = None) -> DistInfo:
    """Join the process group torchrun set up (a one-process :class:`DistInfo` without torchrun).

    ``world_size`` (``--world-size``) must agree with torchrun's when given; ``dist_url`` is the
    ``init_method`` (``env://`` reads torchrun's ``MASTER_ADDR``/``MASTER_PORT``).
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or env_world == 1:
        if world_size not in (None, 1):
            raise SemisparseError(
                f"--world-size {world_size} needs {world_size} processes: launch with "
                f"`torchrun --nproc-per-node {world_size} -m semisparse train ...`"
            )
        return DistInfo()
    if world_size not in (None, env_world):
        raise SemisparseError(f"--world-size {world_size} disagrees with torchrun's WORLD_SIZE={env_world}")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        _import_collectives_with_group_defaults()
        dist.init_process_group(backend, init_method=dist_url, world_size=env_world, rank=rank)
    return DistInfo(rank, env_world, local_rank)


def _import_collectives_with_group_defaults() -> None:
    """Import ``torch.distributed.nn.functional`` while no process group exists.

    Its collectives take ``group=group.WORLD`` as a default argument, evaluated at import. DDP imports the
    module lazily, so when that first happens after ``init_process_group`` ten function defaults hold the
    default group for good: ``destroy_process_group`` can then never free it, and the gloo group's worker
    threads live on until the interpreter exits. A worker still releasing the last gradient all-reduce then
    (its work holds the Python context that backward stashes) needs the GIL of an interpreter that is being
    finalized; Python ends that thread, and the unwind through a noexcept destructor calls std::terminate:
    "terminate called without an active exception", SIGABRT, a finished run reported failed.
    Imported first, the defaults are None and the group dies with its last user.
    """
    import torch.distributed.nn.functional  # noqa: F401


def cleanup() -> None:
    """Leave the process group: meet every rank at a barrier, then destroy the group.

    The barrier means no rank closes its connections while a peer is still in a collective with it. It is
    skipped while an exception unwinds (``cleanup`` in a ``finally``): a failed rank's peers may never
    arrive, and it should fail now rather than after the collective timeout.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if sys.exc_info()[1] is None:
            barrier()
    finally:
        dist.destroy_process_group()


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (``t`` itself in a one-process run)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s slice ``perm[rank::world]`` of a per-epoch permutation of ``range(n)``.

    ``shuffle``: the permutation is drawn from ``seed + epoch`` (``set_epoch``), never from the global
    RNG, so a resumed run sees the same order. Train shards are padded (by wrapping around) to equal
    length, as ``DistributedSampler`` does; ``pad=False`` (validation) gives each rank only real samples.
    ``repeats > 1`` is repeated augmentation (``--ra-sampler``): every sample appears ``repeats`` times,
    the copies spread over ranks, and an epoch keeps ``n`` samples in all.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0,
                 pad: bool = True, repeats: int = 1) -> None:  # fmt: skip
        self.n, self.rank, self.world = n, rank, world
        self.shuffle, self.seed, self.pad, self.repeats = shuffle, seed, pad, repeats
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.repeats > 1:
            order = [i for i in order for _ in range(self.repeats)]
        return order

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.repeats > 1:  # keep n samples per epoch in all, as torchvision's RASampler
            per_rank = math.ceil(self.n / self.world)
            order = order[: per_rank * self.world] if len(order) >= per_rank * self.world else order
            return iter(order[self.rank :: self.world][:per_rank])
        if self.pad and len(order) % self.world:
            order += order[: self.world - len(order) % self.world]
        return iter(order[self.rank :: self.world])

    def __len__(self) -> int:
        if self.repeats > 1 or self.pad:
            return math.ceil(self.n / self.world)
        return len(range(self.rank, self.n, self.world))
