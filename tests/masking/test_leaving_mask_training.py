"""Leaving learned-mask training by any route gives back what it took: weights train again after
``ss.finalize``, and BatchNorm follows the model's mode again."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import semisparse as ss


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))


def _all_train(model: nn.Module) -> None:
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert not frozen, f"still frozen: {frozen}"


def test_overwrite_with_fixed_masks_then_finalize_unfreezes_weights():
    model = _model()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=10)
    ss.sparsify(model, "2:4", overwrite=True)
    ss.finalize(model)
    _all_train(model)


def test_overwrite_with_fixed_masks_trains_the_weights_right_away():
    model = _model()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=10)
    ss.sparsify(model, "2:4", method="random", overwrite=True)
    _all_train(model)  # no learned masks left: nothing is mask training any more


def test_overwrite_gumbel_with_gumbel_keeps_the_first_flags_to_restore():
    model = _model()
    model[4].bias.requires_grad_(False)  # the user's own choice, from before mask training
    ss.sparsify(model, "2:4", method="gumbel", total_steps=10)
    ss.sparsify(model, "2:4", method="gumbel", total_steps=10, overwrite=True)
    ss.finalize(model)
    assert not model[4].bias.requires_grad
    assert model[0].weight.requires_grad and model[4].weight.requires_grad


def test_load_fixed_masks_into_a_mask_training_model_then_finalize_unfreezes(tmp_path):
    src = _model()
    ss.sparsify(src, "2:4")
    path = tmp_path / "fixed.pt"
    ss.save(src, path)
    model = _model()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=10)
    model = ss.load(path, model=model)
    ss.finalize(model)
    _all_train(model)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bn_freeze_gives_batchnorm_back_to_the_models_mode_after_finalize(mode):
    model = _model()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=10, bn="freeze")
    model.train()
    model(torch.randn(2, 8, 6, 6))  # the freeze hook puts BatchNorm in eval mode
    assert not model[1].training
    if mode == "eval":
        model.eval()
    ss.finalize(model)
    assert model[1].training == (mode == "train") == model.training
    before = model[1].running_mean.clone()
    model(torch.randn(2, 8, 6, 6))
    assert torch.equal(model[1].running_mean, before) == (mode == "eval")  # statistics follow again in training


def test_root_module_weight_is_unfrozen_too():
    lin = nn.Linear(16, 8)
    ss.sparsify(lin, "2:4", method="gumbel", total_steps=10)
    assert not lin.parametrizations.weight.original.requires_grad
    ss.finalize(lin)
    _all_train(lin)
