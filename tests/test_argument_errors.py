"""Arguments that used to slip through validation: each is a one-line SemisparseError (a ValueError)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse.errors import SemisparseError


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))


def _one_line(info) -> None:
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


@pytest.mark.parametrize("scale", [-1.0, math.nan, math.inf, "2", True])
def test_srigl_erk_power_scale_must_be_a_finite_non_negative_number(scale):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SemisparseError, match="erk_power_scale") as info:
        ss.SRigL(model, opt, sparsity=0.9, t_end=100, erk_power_scale=scale)
    _one_line(info)
    assert not ss.masks(model)  # refused before the model was touched


def test_srigl_takes_erk_power_scale_zero_and_the_default():
    for scale in (0.0, 1.0, 0.5):
        model = _net()
        ss.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.9, t_end=100,
                 erk_power_scale=scale)
        assert ss.masks(model)


@pytest.mark.parametrize("seed", ["abc", 1.5, None, True])
def test_random_masks_seed_must_be_an_int(seed):
    model = _net()
    with pytest.raises(SemisparseError, match="seed") as info:
        ss.sparsify(model, "2:4", method="random", seed=seed)
    _one_line(info)
    assert not ss.masks(model)


@pytest.mark.parametrize("where", ["include", "exclude"])
@pytest.mark.parametrize("value", [3, [3], ["0", None], b"0"])
def test_include_and_exclude_must_be_name_globs(where, value):
    model = _net()
    with pytest.raises(SemisparseError, match=where) as info:
        ss.sparsify(model, "2:4", **{where: value})
    _one_line(info)
    assert not ss.masks(model)
