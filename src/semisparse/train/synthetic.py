"""``--data-path synthetic``: random in-memory images of ImageNet shape, to measure training throughput.

``synthetic`` gives 12,800 training and 1,280 validation images per epoch; ``synthetic:N`` gives N training
images (and N // 10 validation images, at least one batch). Images are ``3 x S x S`` with ``S`` the crop
size (``--train-crop-size`` / ``--val-crop-size``, default 224), normally distributed like normalised photos,
with labels over 1,000 classes. The loaders (:class:`SyntheticBatches`) hand out one batch collated once and
kept on the training device, so an epoch measures the training step alone: no decoding, no augmentation,
no host-to-device copy. The numbers a model learns from it mean nothing; its speed is the point.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from ..errors import SemisparseError

NAME = "synthetic"
TRAIN_IMAGES = 12_800
NUM_CLASSES = 1000
POOL = 16  # distinct images behind every index


def synthetic_size(path: str) -> int | None:
    """Training images of a ``synthetic[:N]`` data path; None for any other path."""
    if path != NAME and not path.startswith(f"{NAME}:"):
        return None
    if path == NAME:
        return TRAIN_IMAGES
    text = path.partition(":")[2]
    if not text.isdigit() or int(text) < 1:
        raise SemisparseError(f"--data-path {path!r}: expected 'synthetic' or 'synthetic:N' with N >= 1 images")
    return int(text)


class SyntheticImages(Dataset):
    """``length`` images ``(3, size, size)`` and labels, drawn once from a fixed seed (``POOL`` distinct ones)."""

    def __init__(self, length: int, size: int = 224, num_classes: int = NUM_CLASSES, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.length = int(length)
        self.images = torch.randn(min(POOL, self.length), 3, size, size, generator=g)
        self.labels = torch.randint(0, num_classes, (len(self.images),), generator=g)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = i % len(self.images)
        return self.images[j], int(self.labels[j])


class SyntheticBatches:
    """A loader of ``len(self)`` batches of ``batch_size`` images of ``data`` for this rank: one batch built
    once on ``device`` and handed out again each time (its tensors are never written to by training)."""

    sampler = None

    def __init__(self, data: SyntheticImages, batch_size: int, device: torch.device | str = "cpu",
                 rank: int = 0, world: int = 1) -> None:  # fmt: skip
        per_rank = math.ceil(len(data) / max(1, world))
        self.batches = max(1, math.ceil(per_rank / batch_size))
        idx = [(rank * per_rank + k) for k in range(batch_size)]
        self.x = torch.stack([data[i][0] for i in idx]).to(device)
        self.y = torch.tensor([data[i][1] for i in idx], device=device)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.batches):
            yield self.x, self.y
