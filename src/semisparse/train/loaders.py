"""DataLoaders for a :class:`~semisparse.train.data.DataSets`: sharded per rank, reproducible per epoch.

An ImageFolder's loaders are :class:`ImageLoader`: a file that cannot be decoded (an
:class:`~semisparse.train.data.UnreadableImage` sample, made in whichever worker read it) is a one-line
error naming the file, raised in the main process, or with ``skip_bad_images`` is left out of its batch,
named once and counted (:class:`SkippedImages`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, default_collate

from ..errors import SemisparseError
from .data import DataSets, UnreadableImage
from .distributed import ShardSampler
from .synthetic import SyntheticBatches


@dataclass
class PartialBatch:
    """What a worker's collate returns when a batch held unreadable files: the rest (None if nothing is
    left) and the unreadable ones, for the main process to refuse or skip."""

    batch: object
    unreadable: list[UnreadableImage]


def collate_readable(samples: list):
    """``default_collate``, or a :class:`PartialBatch` when some samples are :class:`UnreadableImage`."""
    bad = [s[0] for s in samples if isinstance(s[0], UnreadableImage)]
    if not bad:
        return default_collate(samples)
    good = [s for s in samples if not isinstance(s[0], UnreadableImage)]
    return PartialBatch(default_collate(good) if good else None, bad)


class SkippedImages:
    """The unreadable files a run left out (``--skip-bad-images``): each named once when first met."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}

    def add(self, bad: UnreadableImage) -> None:
        if bad.path not in self.files:
            self.files[bad.path] = bad.reason
            print(f"skipping unreadable image {bad.path}: {bad.reason}", file=sys.stderr, flush=True)

    def summary(self) -> str:
        n = len(self.files)
        return f"--skip-bad-images: skipped {n} unreadable image file{'s' if n != 1 else ''} (named above)"


class ImageLoader(DataLoader):
    """A DataLoader whose unreadable images are refused in one line (``skipped`` None) or skipped."""

    def __init__(self, dataset, *, skipped: SkippedImages | None = None, **kwargs) -> None:
        super().__init__(dataset, collate_fn=collate_readable, **kwargs)
        self.skipped = skipped

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, PartialBatch):
                if self.skipped is None:
                    raise batch.unreadable[0].error()
                for bad in batch.unreadable:
                    self.skipped.add(bad)
                if batch.batch is None:
                    continue
                batch = batch.batch
            yield batch


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
    skip_bad_images: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders. ``batch_size`` is per process; the train order comes from ``seed + epoch``
    (call ``loader.sampler.set_epoch``, which :func:`~semisparse.train.fit` does); ``ra_reps > 1`` is
    repeated augmentation. Validation is split over ranks without padding, in order. ImageFolder data
    gets :class:`ImageLoader` s sharing one :class:`SkippedImages` (``loader.skipped``) when
    ``skip_bad_images``. Synthetic data gets :class:`~semisparse.train.synthetic.SyntheticBatches`, already
    on ``device``."""
    if skip_bad_images and data.kind != "imagefolder":
        raise SemisparseError(f"skip_bad_images applies to ImageFolder data (files decoded one by one), not to "
                              f"{data.kind}, which is checked whole when loaded")  # fmt: skip
    if data.kind == "synthetic":
        return (SyntheticBatches(data.train, batch_size, device, rank, world),
                SyntheticBatches(data.val, val_batch_size or batch_size, device, rank, world))  # fmt: skip
    train_sampler = ShardSampler(len(data.train), rank, world, shuffle=True, seed=seed, repeats=ra_reps)
    val_sampler = ShardSampler(len(data.val), rank, world, shuffle=False, pad=False)
    pin = torch.cuda.is_available()
    make, extra = DataLoader, {}
    if data.kind == "imagefolder":
        make, extra = ImageLoader, {"skipped": SkippedImages() if skip_bad_images else None}
    train = make(data.train, batch_size=batch_size, sampler=train_sampler, num_workers=workers, pin_memory=pin,
                 **extra)  # fmt: skip
    val = make(data.val, batch_size=val_batch_size or batch_size, sampler=val_sampler, num_workers=workers,
               pin_memory=pin, **extra)  # fmt: skip
    return train, val
