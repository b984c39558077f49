"""A tiny BatchNorm CNN registered as model "tiny" (an autouse fixture where imported), so files naming it load."""

import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse import models


def tiny(num_classes: int = 10, width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 32, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


BUILT_ON = []  # the default device of every build of "tiny": a big one must only ever be on the meta device


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    def build(num_classes=1000, width=16):
        device = torch.get_default_device()
        BUILT_ON.append((device.type, num_classes, width))
        if device.type != "meta" and max(num_classes, width) > 10_000:
            raise AssertionError(f"a header made the load build a model of width {width} on {device}")
        torch.manual_seed(99)  # different values from the saved model: loading must fill them
        return tiny(num_classes, width)

    BUILT_ON.clear()
    monkeypatch.setitem(models.MODELS, "tiny", build)


def sparse_tiny(pattern="2:4", num_classes=10) -> nn.Module:
    torch.manual_seed(0)
    model = tiny(num_classes)
    model.semisparse_arch = {"name": "tiny", "num_classes": num_classes}
    ss.sparsify(model, pattern)
    return model
