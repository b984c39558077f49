"""``--data-path synthetic[:N]``: in-memory random images of ImageNet shape, batches already on the device."""

from __future__ import annotations

import pytest
import torch

from semisparse.cli import main
from semisparse.errors import SemisparseError
from semisparse.train.data import AugmentOptions, load_data
from semisparse.train.loaders import make_loaders
from semisparse.train.synthetic import SyntheticBatches, synthetic_size


def test_synthetic_data_has_imagenet_shape_and_classes():
    data = load_data("synthetic")
    assert data.kind == "synthetic" and data.num_classes == 1000
    assert len(data.train) == 12_800 and len(data.val) == 1_280
    x, y = data.train[5]
    assert x.shape == (3, 224, 224) and 0 <= y < 1000
    small = load_data("synthetic:40", AugmentOptions(train_crop_size=32, val_crop_size=16))
    assert len(small.train) == 40 and len(small.val) == 4
    assert small.train[0][0].shape == (3, 32, 32) and small.val[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("spec", ["synthetic:0", "synthetic:many", "synthetic:-3"])
def test_bad_synthetic_sizes_are_one_line_errors(spec):
    with pytest.raises(SemisparseError, match="synthetic:N"):
        synthetic_size(spec)
    assert synthetic_size("digits") is None


def test_synthetic_loaders_hand_out_one_batch_made_once_per_rank():
    data = load_data("synthetic:70", AugmentOptions(train_crop_size=8, val_crop_size=8))
    train, val = make_loaders(data, batch_size=16, rank=1, world=2, device="cpu")
    assert isinstance(train, SyntheticBatches) and len(train) == 3 and len(val) == 1  # ceil(35 / 16), 7 -> 1
    batches = list(train)
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (16, 3, 8, 8) and y.shape == (16,) and y.dtype == torch.long
    assert all(b[0].data_ptr() == x.data_ptr() for b in batches)  # nothing is copied per step
    other, _ = make_loaders(data, batch_size=16, rank=0, world=2)
    assert not torch.equal(next(iter(other))[0], x) or len(data.train.images) == 1  # ranks start apart


def test_cli_trains_on_synthetic_data_and_refuses_augmentation_flags(capsys):
    base = ["train", "--device", "cpu", "--data-path", "synthetic:4", "--train-crop-size", "32", "--val-crop-size",
            "32", "--model", "resnet18", "-b", "4", "--epochs", "1", "--print-freq", "0"]  # fmt: skip
    assert main(base) == 0
    assert "epoch 0" in capsys.readouterr().out
    assert main([*base, "--auto-augment", "ra"]) == 2
    assert "no effect on --data-path synthetic" in capsys.readouterr().err
