"""A small CNN with every calibrated layer kind (a padded-taps stem, a grouped conv, Linear layers; every layer's
rows a multiple of 4) and its calibration batches, for the one-shot tests."""

from __future__ import annotations

import torch
from torch import nn


def oneshot_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),        # pad=True: N:M along kernel taps
        nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),  # 4 rows per group
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4),
    )


def calibration_batches(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]
