"""Data sets: the bundled digits, CIFAR-10 on disk and ImageFolder trees, each on a tiny instance."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import semisparse as ss
from helpers.datasets import write_cifar, write_imagefolder
from semisparse.train.data import AugmentOptions, load_data


def test_digits_split_and_shapes():
    d = load_data("digits")
    assert (len(d.train), len(d.val), d.num_classes, d.kind) == (1440, 357, 10, "digits")
    x, y = d.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= int(y) < 10
    assert abs(float(d.train.tensors[0].mean())) < 1e-4  # standardised with the train statistics


def test_cifar10_on_disk_layout(tmp_path):
    write_cifar(tmp_path)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        d = load_data(str(path))
        assert (len(d.train), len(d.val), d.num_classes, d.kind) == (20, 4, 10, "cifar10")
        x, y = d.train[1]
        assert x.shape == (3, 32, 32) and y == 1
        assert d.classes[0] == "c0"


def test_cifar10_pixels_in_torchvision_order(tmp_path):
    d = write_cifar(tmp_path, n=1)
    data = np.zeros((1, 3072), dtype=np.uint8)
    data[0, :1024] = 255  # red plane
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": [3]}, f)
    ds = load_data(str(tmp_path)).val
    ds.transform = None
    img = np.asarray(ds[0][0])
    assert img.shape == (32, 32, 3) and img[..., 0].min() == 255 and img[..., 1:].max() == 0


def test_cifar10_missing_or_malicious_files_are_clear_errors(tmp_path):
    d = write_cifar(tmp_path)
    os.remove(d / "data_batch_3")
    with pytest.raises(ss.SemisparseError, match="data_batch_3 is missing.*cifar-10-batches-py"):
        load_data(str(tmp_path))

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(ss.SemisparseError, match="malformed"):
        load_data(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_imagefolder_tree(tmp_path):
    write_imagefolder(tmp_path, classes=("cat", "dog", "emu"))
    aug = AugmentOptions(train_crop_size=24, val_resize_size=28, val_crop_size=20)
    d = load_data(str(tmp_path), aug)
    assert (len(d.train), len(d.val), d.num_classes, d.classes) == (6, 6, 3, ["cat", "dog", "emu"])
    assert d.train[0][0].shape == (3, 24, 24) and d.val[0][0].shape == (3, 20, 20)


@pytest.mark.parametrize("make", ["missing", "file", "empty", "no_val", "empty_classes", "class_mismatch"])
def test_bad_data_paths_name_the_expected_layout(tmp_path, make):
    path = tmp_path / "data"
    if make == "file":
        path.write_text("x")
    elif make == "empty":
        path.mkdir()
    elif make == "no_val":
        write_imagefolder(path, splits=("train",))
    elif make == "empty_classes":
        (path / "train" / "a").mkdir(parents=True)
        (path / "val" / "a").mkdir(parents=True)
    elif make == "class_mismatch":
        write_imagefolder(path, classes=("a", "b"), splits=("train",))
        write_imagefolder(path, classes=("a", "c"), splits=("val",))
    with pytest.raises(ss.SemisparseError, match=r"train|ImageFolder|layout") as e:
        load_data(str(path))
    assert "\n" not in str(e.value)


def test_cache_dataset_reuses_the_file_index(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = write_imagefolder(tmp_path / "data")
    first = load_data(str(root), cache=True)
    cached = list((tmp_path / "cache" / "semisparse" / "datasets").glob("*.json"))
    assert len(cached) == 2
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "train" / "a" / "new.png")
    again = load_data(str(root), cache=True)  # the index comes from the cache: the new file is not seen
    assert len(again.train) == len(first.train) == 4
    assert len(load_data(str(root)).train) == 5
    assert again.train[0][0].shape == first.train[0][0].shape


# --- damaged files: one line naming the file and its folder (worker processes included), or skipped -------


def _damage(path, how):
    if how == "garbage":
        path.write_bytes(b"not an image at all")
    else:  # truncated: a valid header, then the data stops
        path.write_bytes(path.read_bytes()[:80])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_an_unreadable_image_is_one_line_naming_the_file_and_folder(tmp_path, workers, how):
    from semisparse.train.loaders import make_loaders

    root = write_imagefolder(tmp_path / "data", per_class=2, size=16)
    bad = root / "train" / "b" / "1.png"
    _damage(bad, how)
    d = load_data(str(root), AugmentOptions(train_crop_size=8, val_resize_size=8, val_crop_size=8))
    train, _ = make_loaders(d, batch_size=2, workers=workers)
    with pytest.raises(ss.SemisparseError) as e:
        for _ in train:
            pass
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and f"folder {root / 'train'}" in msg and "--skip-bad-images" in msg
    assert ("not an image file" if how == "garbage" else "truncated") in msg


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_images_leaves_them_out_and_counts_each_file_once(tmp_path, workers, capsys):
    from semisparse.train.loaders import make_loaders

    root = write_imagefolder(tmp_path / "data", per_class=3, size=16)
    bad = [root / "train" / "a" / "0.png", root / "train" / "b" / "2.png", root / "val" / "a" / "1.png"]
    for i, path in enumerate(bad):
        _damage(path, "garbage" if i % 2 else "truncated")
    d = load_data(str(root), AugmentOptions(train_crop_size=8, val_resize_size=8, val_crop_size=8))
    train, val = make_loaders(d, batch_size=2, workers=workers, skip_bad_images=True)
    for _epoch in range(2):  # the same files, met again, are counted once
        seen = sum(len(y) for _, y in train)
        assert seen == 4
    labels = [int(v) for _, y in val for v in y]
    assert labels == [0, 0, 1, 1, 1]  # val/a/1.png left out, the order kept
    assert set(train.skipped.files) == {str(p) for p in bad} and train.skipped is val.skipped
    assert "skipped 3 unreadable image files" in train.skipped.summary()
    err = capsys.readouterr().err
    assert all(err.count(str(p)) == 1 for p in bad)


def test_skip_bad_images_is_refused_where_files_are_not_decoded_one_by_one():
    from semisparse.train.loaders import make_loaders

    with pytest.raises(ss.SemisparseError, match="ImageFolder"):
        make_loaders(load_data("digits"), 8, skip_bad_images=True)


@pytest.mark.parametrize("damage, message", [
    (lambda b: {**b, "data": b["data"].astype(np.float32)}, "holds float32 pixels; expected uint8"),
    (lambda b: {**b, "labels": [-1] + b["labels"][1:]}, "label -1 is negative"),
    (lambda b: {**b, "labels": ["cat"] * len(b["labels"])}, "labels must be a list of integers"),
])
def test_cifar10_pixels_or_labels_of_the_wrong_kind_name_the_file(tmp_path, damage, message):
    d = write_cifar(tmp_path)
    with open(d / "data_batch_4", "rb") as f:
        batch = pickle.load(f)
    with open(d / "data_batch_4", "wb") as f:
        pickle.dump(damage(batch), f)
    with pytest.raises(ss.SemisparseError, match=message) as e:
        load_data(str(tmp_path))
    assert "\n" not in str(e.value) and str(d / "data_batch_4") in str(e.value)
