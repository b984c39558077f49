"""``semisparse train --enable-dali [--dali-cpu]``: NVIDIA DALI loaders for ImageFolder trees.

Without DALI (its import made to fail) the CLI exits 2 with one line naming the pip package; with DALI
installed (skipped otherwise) the CPU pipeline is run for real: shapes, dtypes, labels, sharding, per-epoch
order, normalisation, and one epoch of ``semisparse train``.
"""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from semisparse.cli import main
from semisparse.cli import train as cli_train
from semisparse.errors import SemisparseError
from semisparse.train.dali import make_dali_loaders, require_dali
from semisparse.train.data import IMAGENET_MEAN, IMAGENET_STD, DataSets, load_data

SIZES = ["--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32"]


def write_jpeg_folder(root, classes=("a", "b"), per_class=4, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def img(tmp_path_factory):
    return write_jpeg_folder(tmp_path_factory.mktemp("dali_img"))


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def dali():
    return pytest.importorskip("nvidia.dali")


@pytest.fixture
def no_dali(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` raises ImportError


# --- without DALI -------------------------------------------------------------------------------------------


def test_missing_dali_is_a_one_line_error_naming_the_package(no_dali, img, capsys):
    capsys.readouterr()
    argv = ["train", "--data-path", str(img), "--model", "digits_cnn", "--epochs", "1", "--device", "cpu",
            *SIZES, "--enable-dali", "--dali-cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "pip install nvidia-dali-cuda120" in err and "nvidia-dali-cuda130" in err, err


def test_require_dali_raises_semisparse_error(no_dali):
    with pytest.raises(SemisparseError, match="pip install nvidia-dali-cuda120"):
        require_dali()


@pytest.mark.parametrize("argv, message", [
    (["--enable-dali"], "ImageFolder trees"),  # digits
    (["--enable-dali", "--data-path", "IMG", "--auto-augment", "ra"], "not available with --enable-dali"),
    (["--enable-dali", "--data-path", "IMG", "--random-erase", "0.5"], "not available with --enable-dali"),
    (["--enable-dali", "--data-path", "IMG", "--use-v2"], "not available with --enable-dali"),
    (["--dali-cpu", "--data-path", "IMG"], "needs --enable-dali"),
])
def test_inapplicable_dali_combinations_are_refused(argv, message, img, capsys):
    argv = [str(img) if t == "IMG" else t for t in argv]
    capsys.readouterr()
    assert main(["train", "--epochs", "1", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_non_imagefolder_data_is_refused():
    data = load_data("digits")
    cifar_like = DataSets(data.train, data.val, 10, "cifar10")
    with pytest.raises(SemisparseError, match="ImageFolder trees .* not cifar10 data"):
        make_dali_loaders(cifar_like, 4)


# --- with DALI (CPU pipeline) --------------------------------------------------------------------------------


def _loaders(root, batch_size=3, **kw):
    data = load_data(str(root))
    kw = {"crop_size": 32, "val_resize_size": 36, "val_crop_size": 32, "device": "cpu", "dali_cpu": True, **kw}
    return make_dali_loaders(data, batch_size, **kw)


def test_loaders_yield_batches_like_a_dataloader(dali, img):
    train, val = _loaders(img)
    assert (len(train), len(val), train.batch_size) == (3, 3, 3)
    labels = []
    for loader in (train, val):
        batches = list(loader)
        assert [len(y) for _, y in batches] == [3, 3, 2]
        for x, y in batches:
            assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
            assert torch.isfinite(x).all() and x.std() > 0.1
        labels.append(torch.cat([y for _, y in batches]).tolist())
    assert sorted(labels[0]) == [0] * 4 + [1] * 4  # every training image once per epoch
    assert labels[1] == [0] * 4 + [1] * 4  # validation in order


def test_train_order_is_seeded_per_epoch(dali, img):
    train, _ = _loaders(img, batch_size=8)
    a = next(iter(train))[0]
    assert torch.equal(a, next(iter(train))[0])  # same seed and epoch: the same batch
    train.sampler.set_epoch(1)
    assert not torch.equal(a, next(iter(train))[0])


def test_loaders_shard_by_rank(dali, img):
    seen = []
    for rank in (0, 1):
        train, val = _loaders(img, batch_size=2, rank=rank, world=2)
        assert (len(train), len(val)) == (2, 2)
        seen.append(torch.cat([y for _, y in val]).tolist())
    assert seen == [[0, 0, 1, 1], [0, 0, 1, 1]]  # val indices 0,2,4,6 and 1,3,5,7


def test_output_is_normalised_with_imagenet_statistics(dali, tmp_path):
    color = np.array([200, 100, 50], dtype=np.uint8)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.broadcast_to(color, (40, 40, 3)).copy()).save(tmp_path / split / c / "0.png")
    expected = (torch.tensor(color / 255.0) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for loader in _loaders(tmp_path, batch_size=2):
        x, _ = next(iter(loader))
        assert torch.allclose(x.mean(dim=(0, 2, 3)).double(), expected, atol=0.02)


def test_setup_builds_dali_loaders(dali, img):
    args = cli_train.validate(cli_train.parse_args([
        "--device", "cpu", "--data-path", str(img), "--model", "digits_cnn", "-b", "4", "-j", "1", *SIZES,
        "--enable-dali", "--dali-cpu",
    ]))  # fmt: skip
    run = cli_train.setup(args)
    assert type(run.train_loader).__name__ == "DALILoader" and len(run.train_loader) == 2
    assert run.train_loader.cpu and run.train_loader.num_threads == 1


def test_one_epoch_of_semisparse_train_with_dali(dali, img, capsys):
    argv = ["train", "--data-path", str(img), "--model", "resnet18", "--epochs", "1", "-b", "4", *SIZES,
            "--enable-dali", "--dali-cpu", "--device", "cpu", "--print-freq", "0"]  # fmt: skip
    assert main(argv) == 0
    assert "epoch 0:" in capsys.readouterr().out
