"""DataLoaders for a :class:`~semisparse.train.data.DataSets`: sharded per rank, reproducible per epoch."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .data import DataSets
from .distributed import ShardSampler
from .synthetic import SyntheticBatches


def make_loaders(
    data: DataSets,
    batch_size: int,
    workers: int = 0,
    *,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    ra_reps: int = 1,
    val_batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders. ``batch_size`` is per process; the train order comes from ``seed + epoch``
    (call ``loader.sampler.set_epoch``, which :func:`~semisparse.train.fit` does); ``ra_reps > 1`` is
    repeated augmentation. Validation is split over ranks without padding, in order. Synthetic data gets
    :class:`~semisparse.train.synthetic.SyntheticBatches`, already on ``device``."""
    if data.kind == "synthetic":
        return (SyntheticBatches(data.train, batch_size, device, rank, world),
                SyntheticBatches(data.val, val_batch_size or batch_size, device, rank, world))  # fmt: skip
    train_sampler = ShardSampler(len(data.train), rank, world, shuffle=True, seed=seed, repeats=ra_reps)
    val_sampler = ShardSampler(len(data.val), rank, world, shuffle=False, pad=False)
    pin = torch.cuda.is_available()
    train = DataLoader(data.train, batch_size=batch_size, sampler=train_sampler, num_workers=workers,
                       pin_memory=pin)  # fmt: skip
    val = DataLoader(data.val, batch_size=val_batch_size or batch_size, sampler=val_sampler, num_workers=workers,
                     pin_memory=pin)  # fmt: skip
    return train, val
