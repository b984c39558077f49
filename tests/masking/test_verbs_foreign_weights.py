"""ss.sparsify refuses weights that torch computes or already parametrizes, before touching any layer."""

import warnings

import pytest
import torch
from torch import nn

import semisparse as ss


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _snapshot(model: nn.Module) -> tuple[dict, list]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return sd, [type(m).__name__ for m in model.modules()]


def _assert_identical(model: nn.Module, before: tuple[dict, list]) -> None:
    sd, (ref, kinds) = model.state_dict(), before
    assert list(sd) == list(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in sd)
    assert [type(m).__name__ for m in model.modules()] == kinds
    assert not any(hasattr(m, "parametrizations") and "weight" in m.parametrizations and
                   any(isinstance(p, ss.masking.SparseParametrization) for p in m.parametrizations.weight)
                   for m in model.modules())


def test_old_style_weight_norm_is_refused_in_one_line_and_model_untouched():
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(model[2])  # the middle layer: the first would be masked before it
    before = _snapshot(model)
    with pytest.raises(ss.SemisparseError, match=r"2\.weight .*weight_norm.*remove_weight_norm") as e:
        ss.sparsify(model, "2:4")
    assert "\n" not in str(e.value)
    _assert_identical(model, before)
    assert not ss.masks(model)


def test_second_parametrization_is_refused_with_how_to_proceed_and_model_untouched():
    model = _net()
    torch.nn.utils.parametrizations.weight_norm(model[2])
    before = _snapshot(model)
    with pytest.raises(ss.SemisparseError, match=r"2\.weight already carries .*remove_parametrizations") as e:
        ss.sparsify(model, "2:4")
    assert "\n" not in str(e.value)
    _assert_identical(model, before)
    # the advice works: fold it, then sparsify
    torch.nn.utils.parametrize.remove_parametrizations(model[2], "weight")
    ss.sparsify(model, "2:4")
    ss.check(model)
