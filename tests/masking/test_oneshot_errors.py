"""Bad calibration input for the calibrated one-shot methods: one line each, and the model unchanged."""

import pytest
import torch
from torch import nn

import semisparse as ss


class Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)  # NaN for negative inputs


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), Log(), nn.Linear(8, 4))


def _snapshot(model: nn.Module):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(type(m).__name__, m.training) for m in model.modules()])


def _unchanged(model: nn.Module, before) -> None:
    sd, kinds = before
    now = model.state_dict()
    assert list(now) == list(sd)
    assert all(torch.equal(now[k], sd[k]) for k in sd)
    assert [(type(m).__name__, m.training) for m in model.modules()] == kinds
    assert not ss.masks(model)


POSITIVE = [torch.rand(6, 8) + 0.5 for _ in range(2)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(calibration=[]), r"^calibration is empty"),
        (dict(), r"needs calibration=\.\.\."),
        (dict(calibration=[torch.randn(6, 5)]),
         r"^the model rejected the calibration inputs \(0\.weight takes 8 input features, got 5\)"),
        (dict(calibration=["a", "b"]), r"^calibration batch 0 is a str, not an input of the model"),
        (dict(calibration=torch.randn(6, 8)), r"not a single Tensor"),
        (dict(calibration=[torch.full((6, 8), float("nan"))]), r"^0\.weight: its calibration inputs contain NaN"),
        (dict(calibration=[-POSITIVE[0] * 1e3]), r"^3\.weight: its calibration inputs contain NaN"),
        (dict(calibration=[POSITIVE[0] * 1e25]), r"^0\.weight: its input Hessian cannot be factored"),
        (dict(calibration=POSITIVE, calib_batches=0), r"^calib_batches must be a positive int"),
        (dict(calibration=POSITIVE, dampening=-1.0), r"^dampening must be a number > 0"),
        (dict(calibration=lambda m: m(torch.randn(6, 3))), r"^the model rejected the calibration inputs"),
        (dict(calibration=[torch.randn(6, 8, 2, 2)]), r"^the model rejected the calibration inputs \("),
    ],
    ids=["empty", "missing", "rejected", "non-tensor", "single tensor", "nan input", "nan in a later layer",
         "not factorable", "calib_batches", "dampening", "forward_loop rejected", "rejected by the model itself"],
)
def test_bad_calibration_is_one_line_and_leaves_the_model_unchanged(kwargs, message):
    model = _net()
    model.train()
    before = _snapshot(model)
    with pytest.raises(ss.SemisparseError, match=message) as e:
        ss.sparsify(model, "2:4", method="sparsegpt", **kwargs)
    assert "\n" not in str(e.value)
    _unchanged(model, before)


def test_multi_pass_errors_also_leave_the_model_unchanged():
    model = _net()
    before = _snapshot(model)
    # the first batch is fine, the second makes the last layer's inputs NaN: the earlier layers were pruned
    # on the working copy already
    with pytest.raises(ss.SemisparseError, match=r"^3\.weight"):
        ss.sparsify(model, "2:4", method="wanda", calibration=[POSITIVE[0], -POSITIVE[1] * 1e3])
    _unchanged(model, before)


def test_recalibrate_bn_on_bad_input_restores_the_statistics():
    model = _net()
    before = _snapshot(model)
    with pytest.raises(ss.SemisparseError, match=r"^the model rejected the calibration inputs"):
        ss.recalibrate_bn(model, [torch.randn(6, 8), torch.randn(6, 3)])
    _unchanged(model, before)


def test_prior_from_needs_calibration_and_a_known_method():
    model = _net()
    with pytest.raises(ss.SemisparseError, match=r"prior_from must be one of"):
        ss.sparsify(model, "2:4", method="gumbel", prior_from="obs", total_steps=5)
    with pytest.raises(ss.SemisparseError, match=r"prior_from='sparsegpt' needs calibration"):
        ss.sparsify(model, "2:4", method="gumbel", prior_from="sparsegpt", total_steps=5)
    assert not ss.masks(model)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("value", [0, -4, 2.0, True, "4"], ids=repr)
def test_bad_shared_rows_is_one_line_before_any_calibration(method, value):
    model = _net()
    before = _snapshot(model)
    with pytest.raises(ss.SemisparseError, match=r"^shared_rows must be an int >= 1 .*, got ") as e:
        ss.sparsify(model, "2:4", method=method, calibration=POSITIVE, shared_rows=value)
    assert "\n" not in str(e.value)
    _unchanged(model, before)
