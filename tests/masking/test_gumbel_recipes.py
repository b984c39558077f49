"""Every learned-mask recipe parses and runs one epoch (two steps) of `semisparse train` on a tiny ImageFolder."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import semisparse as ss
from semisparse.cli import main
from semisparse.models import create_model

RECIPES = sorted((Path(ss.__file__).parent / "recipes").glob("mask_*.yaml"))
QUICK = {"mask_imagenet_resnet18_2x4"}


def test_the_papers_set_ups_are_all_there():
    names = {p.stem for p in RECIPES}
    for model in ("resnet18", "resnet34", "resnet50", "convnext_tiny", "convnext_small"):
        assert f"mask_imagenet_{model}_2x4" in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_is_mask_only_training_with_a_falling_temperature(path):
    recipe = yaml.safe_load(path.read_text())
    assert recipe["sparsity"] == "gumbel_2x4" and recipe["trainable"] == "gumbel_2x4"
    start, end = recipe["mask-tau"]
    assert start >= end > 0 and recipe["mask-prior"] >= 0
    assert {"model", "data-path", "epochs", "batch-size", "opt", "lr"} <= set(recipe)
    assert "weights" not in recipe  # the user supplies the dense weights (and --resume must stay possible)


def _imagefolder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=p.stem, marks=[] if p.stem in QUICK else [pytest.mark.slow]) for p in RECIPES]
)
def test_recipe_runs_on_tiny_data_with_frozen_dense_weights(path, tmp_path):
    recipe = yaml.safe_load(path.read_text())
    _imagefolder(tmp_path / "data")
    torch.manual_seed(0)
    dense = create_model(recipe["model"], num_classes=2)
    torch.save(dense.state_dict(), tmp_path / "dense.pth")
    out = tmp_path / "run"
    argv = [
        "train", "--config", str(path), "--data-path", str(tmp_path / "data"), "--weights", str(tmp_path / "dense.pth"),
        "--epochs", "1", "-b", "2", "--device", "cpu", "--workers", "0", "--train-crop-size", "32",
        "--val-resize-size", "32", "--val-crop-size", "32", "--output-dir", str(out), "--print-freq", "0",
    ]
    assert main(argv) == 0
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    sd = ckpt["model"]
    originals = {k: v for k, v in sd.items() if k.endswith("parametrizations.weight.original")}
    assert originals, "no learned masks in the checkpoint"
    ref = dense.state_dict()
    for k, v in originals.items():  # mask-only training: the dense weights are bit-identical
        assert torch.equal(v, ref[k.replace("parametrizations.weight.original", "weight")])
