"""Every method that sets its own masks opens the same way (dst/selection.py): same checks, same words."""

import pytest
import torch
from torch import nn

import semisparse as ss


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))


def _srste(model, opt, **kw):
    return ss.SRSTE(model, opt, "2:4", **kw)


def _srigl(model, opt, **kw):
    return ss.SRigL(model, opt, 0.5, t_end=10, **kw)


@pytest.mark.parametrize("make", [_srste, _srigl])
def test_unknown_dense_layer_glob_is_refused_and_model_untouched(make):
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ss.SemisparseError, match="dense_layers nope match no"):
        make(model, opt, dense_layers="nope")
    assert not list(ss.masks(model)) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("make", [_srste, _srigl])
def test_first_keeps_the_first_layer_dense(make):
    model = _net()
    make(model, torch.optim.SGD(model.parameters(), lr=0.1), dense_layers="first")
    assert sorted(ss.masks(model)) == ["3.weight"]


@pytest.mark.parametrize("make", [_srste, _srigl])
def test_a_masked_model_is_refused_in_the_same_words(make):
    model = _net()
    ss.sparsify(model, "2:4")
    with pytest.raises(ss.SemisparseError, match="model is already sparsified .* start from a dense model"):
        make(model, torch.optim.SGD(model.parameters(), lr=0.1))
