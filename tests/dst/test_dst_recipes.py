"""Every DST recipe parses, builds its scheduler through ``from_flags`` and runs one update step on tiny data."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import semisparse as ss
from semisparse.dst import from_flags
from semisparse.models import create_model

RECIPES = sorted((Path(ss.__file__).parent / "recipes").glob("dst_*.yaml"))
DST_KEYS = {"sparsity-level", "delta", "alpha", "t-end", "distribution", "ablation", "dense-layers", "pattern"}


def _optimizer(recipe, model):
    opt, lr, wd = recipe["opt"], float(recipe["lr"]), float(recipe.get("wd", 0))
    if opt == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=float(recipe.get("momentum", 0)), weight_decay=wd)
    if opt == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=lr, momentum=float(recipe.get("momentum", 0)),
                                   weight_decay=wd, eps=0.0316, alpha=0.9)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)


def test_the_seed_set_ups_are_all_there():
    names = {p.stem for p in RECIPES}
    for model in ("resnet18", "wrn22_2"):
        for s in (80, 90, 95, 99):
            assert f"dst_cifar10_{model}_srigl{s}" in names
    for model in ("resnet50", "mobilenet_v3_large", "vit_b_16"):
        assert f"dst_imagenet_{model}_srigl90" in names


QUICK = {"dst_cifar10_resnet18_srigl90", "dst_cifar10_wrn22_2_srigl99", "dst_imagenet_mobilenet_v3_large_srigl90"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_with_known_dst_flags(path):
    recipe = yaml.safe_load(path.read_text())
    assert recipe["dst"] == "srigl" and 0 < recipe["sparsity-level"] < 1 and 0 < recipe["t-end"] <= 1
    assert {"model", "epochs", "batch-size", "opt", "lr", "wd", "delta", "alpha", "distribution"} <= set(recipe)


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=[] if p.stem in QUICK else [pytest.mark.slow])
                                  for p in RECIPES])
def test_recipe_runs_one_update_step(path):
    recipe = yaml.safe_load(path.read_text())
    assert recipe["dst"] in ("rigl", "srigl", "sr-ste")
    flags = {k.replace("-", "_"): v for k, v in recipe.items() if k in DST_KEYS}
    torch.manual_seed(0)
    model = create_model(recipe["model"], num_classes=10)
    opt = _optimizer(recipe, model)
    flags["delta"] = 1  # update after the first step
    sched = from_flags(model, opt, recipe["dst"], total_steps=10, **flags)
    res = 224 if "vit" in path.stem else 32
    x, y = torch.randn(2, 3, res, res), torch.randint(0, 10, (2,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert sched.step()
    ss.check(model)
    assert sched.achieved_sparsity >= recipe["sparsity-level"] - 1e-9
    assert sched.achieved_sparsity < recipe["sparsity-level"] + 0.02
    for pattern in recipe.get("dense-layers", []):
        assert not any(k.startswith(pattern + ".") or k == pattern for k in ss.masks(model))
