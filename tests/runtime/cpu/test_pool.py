"""Deployed max pooling: semisparse's kernel equals torch's pooling exactly, and the planner picks it only
where it measured it faster; anything the kernel does not cover falls back to torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy
from semisparse.runtime.cpu import kernels, planner
from semisparse.runtime.cpu.pool import MaxPool2d, is_supported

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler: fast kernels unavailable")


def _pool(k, s, p, ceil=False) -> MaxPool2d:
    return MaxPool2d.from_module(nn.MaxPool2d(k, s, p, ceil_mode=ceil))


@needs_kernels
@settings(max_examples=120, deadline=None)
@given(c=st.integers(1, 5), h=st.integers(1, 19), w=st.integers(1, 19), kh=st.integers(1, 5), kw=st.integers(1, 5),
       sh=st.integers(1, 4), sw=st.integers(1, 4), ph=st.integers(0, 2), pw=st.integers(0, 2),
       ceil=st.booleans(), batched=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_equals_torch_for_any_geometry(c, h, w, kh, kw, sh, sw, ph, pw, ceil, batched, seed):
    if 2 * ph > kh or 2 * pw > kw or h + 2 * ph < kh or w + 2 * pw < kw:
        return  # torch rejects these: the module hands them to torch (tested below)
    x = torch.randn((2, c, h, w) if batched else (c, h, w), generator=torch.Generator().manual_seed(seed))
    pool = _pool((kh, kw), (sh, sw), (ph, pw), ceil)
    want = F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil)
    got = pool(x)
    assert got.shape == want.shape
    assert torch.equal(got, want)


@needs_kernels
def test_resnet_stem_pooling_and_special_values():
    x = torch.randn(1, 64, 112, 112)
    x[0, 3, 10, 10] = float("nan")
    x[0, 5] = float("-inf")
    x[0, 6, :, 0] = float("inf")
    got, want = _pool(3, 2, 1)(x), F.max_pool2d(x, 3, 2, 1)
    assert torch.equal(got.isnan(), want.isnan()) and bool(got[0, 3].isnan().any())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def test_what_the_kernel_does_not_cover_goes_to_torch():
    x = torch.randn(1, 3, 9, 9)
    assert not is_supported(nn.MaxPool2d(3, return_indices=True)) and not is_supported(nn.MaxPool2d(3, dilation=2))
    assert is_supported(nn.MaxPool2d(3)) and not is_supported(nn.AvgPool2d(3))
    pool = _pool(3, 2, 1)
    for inp in (x.double(), x.transpose(2, 3), x.clone().requires_grad_()):  # dtype, layout, autograd
        out = pool(inp)
        torch.testing.assert_close(out, F.max_pool2d(inp, 3, 2, 1))
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        _pool(3, 1, 2)(x)  # torch's own errors for arguments it rejects
    with pytest.raises(RuntimeError, match="stride"):
        _pool(3, 0, 0)(x)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         nn.Conv2d(16, 16, 1), nn.ReLU(), nn.MaxPool2d(2, return_indices=False, ceil_mode=True),
                         nn.Flatten(), nn.Linear(16 * 5 * 5, 10))


def test_deploy_swaps_plain_max_pooling_and_outputs_stay_equal():
    torch.manual_seed(3)
    model = _net()
    ss.sparsify(model, 0.75)
    x = torch.randn(2, 3, 19, 19)
    dep = deploy(model, plan="condensed")
    assert [type(m) for m in dep.modules() if isinstance(m, nn.MaxPool2d)] == [MaxPool2d, MaxPool2d]
    assert all(m.use_kernel for m in dep.modules() if isinstance(m, MaxPool2d))
    with torch.no_grad():
        torch.testing.assert_close(dep(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert all(not m.use_kernel for m in deploy(model, plan="dense").modules() if isinstance(m, MaxPool2d))


@needs_kernels
def test_planner_keeps_the_faster_pooling_and_reports_it(monkeypatch):
    torch.manual_seed(4)
    model = _net()
    ss.sparsify(model, 0.75)
    dep = deploy(model, plan="condensed")
    calls = []

    def fake_times(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):  # first pooling: kernel slower; second: faster
        calls.append(1)
        for fn in fns:
            fn()
        return [1.0, 2.0] if len(calls) == 1 else [2.0, 1.0]

    monkeypatch.setattr(planner, "interleaved_medians", fake_times)
    out = planner.plan_pools(dep, torch.randn(1, 3, 19, 19))
    assert [v["kernel"] for v in out.values()] == ["torch", "semisparse"]
    assert [m.use_kernel for m in dep.modules() if isinstance(m, MaxPool2d)] == [False, True]


@needs_kernels
def test_deploy_plan_records_pooling_choice():
    torch.manual_seed(5)
    model = _net()
    ss.sparsify(model, 0.75)
    dep = deploy(model, example_input=torch.randn(1, 3, 19, 19), reps=3)
    pools = dep.semisparse_plan["pools"]
    assert set(pools) == {"2", "5"}
    for name, v in pools.items():
        pool = dep.get_submodule(name)  # pooling left to torch is torch's own nn.MaxPool2d
        assert v["kernel"] == ("semisparse" if getattr(pool, "use_kernel", False) else "torch")
        assert isinstance(pool, MaxPool2d) == (v["kernel"] == "semisparse")
        assert v["torch_us"] > 0 and v["kernel_us"] > 0 and math.isfinite(v["torch_us"])


@needs_kernels
def test_pooling_left_to_torch_keeps_its_forward_hooks(monkeypatch):
    """Pooling the planner left to torch became a plain nn.MaxPool2d without the forward hooks the model had on
    it: the deployed model silently stopped calling them."""
    def torch_faster(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5, **kw):
        for fn in fns:
            fn()
        return [0.5] + [1.0] * (len(fns) - 1)  # the first candidate: torch's pooling, a dense layer

    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 4)).eval()
    ss.sparsify(model, 0.5)
    seen = []
    model[1].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    monkeypatch.setattr(planner, "interleaved_medians", torch_faster)
    x = torch.randn(1, 3, 8, 8)
    dep = deploy(model, example_input=x, reps=2)
    assert type(dep[1]) is nn.MaxPool2d
    with torch.no_grad():
        want = model(x)
        seen.clear()
        torch.testing.assert_close(dep(x), want, rtol=1e-5, atol=1e-5)
    assert seen == [torch.Size([1, 8, 4, 4])]
