"""``ss.deploy(model, dtype=torch.bfloat16)`` on CPU: condensed values stored in bf16 (half the bytes),
accumulated in fp32; the reference is the masked model computed in fp32 with bf16-rounded weights and inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy, deployed_layers
from semisparse.runtime.cpu import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: bf16 deploy runs dense")


def _rounded(t: torch.Tensor) -> torch.Tensor:
    return t.detach().bfloat16().float()


def _close_in_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` (bf16) is ``want`` (fp32) rounded to bf16, up to one bf16 step (summation order)."""
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


@pytest.mark.parametrize("batch", [(1,), (5,), (2, 70)])
@pytest.mark.parametrize("ablate", [False, True])
def test_bf16_linear_keeps_bf16_values_and_accumulates_in_fp32(batch, ablate):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    m = torch.rand(40, 96) < 0.25
    if ablate:
        m[[3, 17]] = False
    ss.sparsify(lin, None, masks={"weight": m})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "runs dense" warning
        dep = deploy(lin, dtype=torch.bfloat16, plan="condensed")
    assert dep.mode == "condensed" and dep.values.dtype == torch.bfloat16
    assert dep.semisparse_layer_report("").extra["bytes"] < (dep.values.numel() * 4 + dep.idx.numel() * 2
                                                                 + dep.orow.numel() * 8)
    x = torch.randn(*batch, 96)
    with torch.no_grad():
        got = dep(x.bfloat16())
    want = F.linear(_rounded(x), _rounded(lin.weight) * m, _rounded(lin.bias))
    _close_in_bf16(got, want)
    if batch == (1,) and not ablate:  # the bound batch-1 kernel ran on the bf16 values themselves
        assert dep.__dict__["_bound_gemv"].__defaults__[0].bf16 == 1


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("setting", [{}, {"block": 32, "pairs": True, "tile_kb": 0},
                                     {"block": 64, "pairs": False, "tile_kb": 16}])
def test_bf16_conv_keeps_bf16_values_and_accumulates_in_fp32(n, setting):
    torch.manual_seed(1)
    conv = nn.Conv2d(12, 16, 3, padding=1, stride=2)
    ss.sparsify(conv, 0.75)
    m = conv.parametrizations.weight[0].hard_mask().bool() if hasattr(conv, "parametrizations") else None
    dep = deploy(conv, dtype=torch.bfloat16, plan="condensed")
    dep.use_variant(setting)
    assert dep.values.dtype == torch.bfloat16
    w = _rounded(dep._dense_now())  # the masked weight the layer holds, as bf16 values
    if m is not None:
        torch.testing.assert_close(w, _rounded(conv.weight) * m)
    x = torch.randn(n, 12, 11, 11)
    with torch.no_grad():
        got = dep(x.bfloat16())
    _close_in_bf16(got, F.conv2d(_rounded(x), w, _rounded(conv.bias), stride=2, padding=1))


def test_bf16_model_measured_plan_runs_and_matches():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    ss.sparsify(model, 0.8)
    x = torch.randn(1, 3, 8, 8)
    dep = deploy(model, dtype=torch.bfloat16, example_input=x, reps=2)
    with torch.no_grad():
        got = dep(x.bfloat16())
        want = ss.deploy(model, plan="dense")(x)  # fp32 masked model
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
    for _, layer in deployed_layers(dep):
        assert layer.values.dtype == torch.bfloat16


def test_fp32_stays_the_default_and_exact():
    torch.manual_seed(3)
    lin = nn.Linear(64, 24)
    ss.sparsify(lin, 0.75)
    dep = deploy(lin, plan="condensed")
    assert dep.values.dtype == torch.float32
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), lin(x), rtol=1e-5, atol=1e-6)
