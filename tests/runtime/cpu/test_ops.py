"""The torch ops deployed models may run on semisparse's kernels (GELU here; max pooling in test_pool.py), and
the GELU fused into the condensed Linear before it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy
from semisparse.runtime.cpu import kernels, ops, planner
from semisparse.runtime.cpu.layers import SparseLinear

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler: fast kernels unavailable")

ROWS4 = {"panel_width": 24, "pairs": False, "transposed_out": True, "rows4": True}


@needs_kernels
@pytest.mark.parametrize("n", [1, 7, 8, 13, 4096 * 9 + 5])
def test_gelu_kernel_is_within_torchs_own_fp32_error(n):
    """Against torch's GELU in float64: the kernel's error is of the order of torch's fp32 GELU's own
    (1.56e-7 of max(1, |x|) measured), in the vector body and the scalar tail alike."""
    x = torch.linspace(-12, 12, 2_000_001)
    want = F.gelu(x.double())
    err = ((kernels.gelu(x).double() - want).abs() / x.double().abs().clamp_min(1)).max().item()
    assert err < 2.5e-7
    torch_err = ((F.gelu(x).double() - want).abs() / x.double().abs().clamp_min(1)).max().item()
    assert err < 2 * torch_err
    xs = torch.randn(n) * 4
    got = kernels.gelu(xs)
    assert got.shape == xs.shape
    assert ((got.double() - F.gelu(xs.double())).abs() / xs.double().abs().clamp_min(1)).max() < 2.5e-7


@needs_kernels
def test_gelu_kernel_special_values_as_torch():
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([-inf, -3e38, -100.0, -20.0, -0.0, 0.0, 1e-30, 100.0, 3e38, inf, nan] * 2)  # vector and tail
    got, want = kernels.gelu(x), F.gelu(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    fin = ~torch.isnan(want)
    assert torch.equal(got[fin], want[fin])  # 0 below -10 (no denormals), x itself above 10, inf


def _mlp(seed: int = 0, shared_rows: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 64)).eval()
    del model[2]  # (torchvision's MLP has one; Sequential indices then follow its layout without it)
    ss.sparsify(model, "2:4", shared_rows=shared_rows)
    return model


@needs_kernels
@pytest.mark.parametrize("tokens", [50, 24, 197])
def test_a_gelu_after_a_condensed_linear_is_fused_into_its_kernel(monkeypatch, tokens):
    model = _mlp()
    x = torch.randn(1, tokens, 64)
    dep = deploy(model, example_input=x, plan="condensed")
    assert dep.semisparse_plan["fused_gelu"] == ["0"]
    assert dep[0].activation == "gelu" and isinstance(dep[1], ops.GELU) and dep[1].fused
    assert "fused into the Linear before" in repr(dep)
    calls = []
    real = kernels.gelu
    monkeypatch.setattr(kernels, "gelu", lambda y: (calls.append(y.shape), real(y))[1])
    with torch.no_grad():
        want = model(x)
        for setting, post_hoc in ((ROWS4, 0), ({**ROWS4, "rows4": False}, 1)):
            dep[0].use_variant(setting)
            calls.clear()
            torch.testing.assert_close(dep(x), want, rtol=1e-5, atol=2e-6)
            assert len(calls) == post_hoc  # rows4: in the kernel's registers; else one pass after the product
        dep[0].set_mode("dense")  # any path applies it
        torch.testing.assert_close(dep(x), want, rtol=1e-5, atol=2e-6)


@needs_kernels
def test_a_fused_model_scripts_traces_and_runs_unbatched_and_batched():
    model = _mlp(1)
    x = torch.randn(1, 30, 64)
    dep = deploy(model, example_input=x, plan="condensed")
    dep[0].use_variant(ROWS4)
    assert dep[1].fused
    with torch.no_grad():
        for inp in (x, torch.randn(3, 30, 64), torch.randn(64), torch.randn(1, 64)):
            torch.testing.assert_close(dep(inp), model(inp), rtol=1e-5, atol=2e-6)
        scripted = torch.jit.script(dep)
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=2e-6)
        traced = torch.jit.trace(dep, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=2e-6)
    assert dep[1].fused and dep[0].activation == "gelu"  # scripting worked on a copy


def _not_fused(model: nn.Module, x: torch.Tensor) -> nn.Module:
    dep = deploy(model, example_input=x, plan="condensed")
    assert dep.semisparse_plan["fused_gelu"] == []
    assert not any(isinstance(m, SparseLinear) and m.activation for m in dep.modules())
    with torch.no_grad():
        torch.testing.assert_close(dep(x), model(x), rtol=1e-5, atol=2e-6)
    return dep


@needs_kernels
def test_a_gelu_is_not_fused_where_something_could_tell():
    x = torch.randn(1, 30, 64)
    seen = []
    model = _mlp()  # a hook on the GELU sees its input and output
    model[1].register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    dep = _not_fused(model, x)
    with torch.no_grad():
        seen.clear()
        dep(x)
        torch.testing.assert_close(seen[0], F.gelu(F.linear(x, model[0].weight, model[0].bias)), rtol=1e-5, atol=2e-6)
    model = _mlp()  # a forward hook on the Linear sees its output, before the GELU
    model[0].register_forward_hook(lambda m, a, out: None)
    _not_fused(model, x)
    model = _mlp()  # the tanh form is torch's
    model[1] = nn.GELU(approximate="tanh")
    _not_fused(model, x)
    act = nn.GELU()  # one GELU called at two places
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 64), act, nn.Linear(64, 64), act).eval()
    ss.sparsify(model, "2:4", shared_rows=4)
    _not_fused(model, x)

    class Skipping(nn.Sequential):  # a Sequential whose forward is its own
        def forward(self, inp):
            return self[0](inp) + 1

    torch.manual_seed(3)
    model = Skipping(nn.Linear(64, 64), nn.GELU()).eval()
    ss.sparsify(model, "2:4", shared_rows=4)
    _not_fused(model, x)


def _torch_faster(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5, **kw):
    for fn in fns:
        fn()
    return [0.5] + [1.0] * (len(fns) - 1)  # the first candidate: torch's op, a dense layer


@needs_kernels
def test_ops_left_to_torch_are_torchs_modules_with_their_hooks(monkeypatch):
    """Pooling the planner left to torch became a plain nn.MaxPool2d without the forward hooks the model had on
    it; a GELU left to torch (here: its Linear kept dense, so nothing to fuse) is nn.GELU, hooks kept."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 32),
                          nn.GELU(), nn.Linear(32, 4)).eval()
    ss.sparsify(model, 0.5)
    seen = []
    model[1].register_forward_hook(lambda m, a, out: seen.append("pool"))
    model[4].register_forward_hook(lambda m, a, out: seen.append("gelu"))
    monkeypatch.setattr(planner, "interleaved_medians", _torch_faster)
    x = torch.randn(1, 3, 8, 8)
    dep = deploy(model, example_input=x, reps=2)
    assert type(dep[1]) is nn.MaxPool2d and type(dep[4]) is nn.GELU
    assert dep.semisparse_plan["ops"]["4"]["kernel"] == "torch" and dep.semisparse_plan["fused_gelu"] == []
    with torch.no_grad():
        want = model(x)  # (its hooks append too)
        seen.clear()
        torch.testing.assert_close(dep(x), want, rtol=1e-5, atol=1e-5)
    assert seen == ["pool", "gelu"]


@needs_kernels
def test_the_planner_keeps_the_gelu_kernel_where_it_is_faster(monkeypatch):
    def kernel_faster(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5, **kw):
        for fn in fns:
            fn()
        return [1.0] * (len(fns) - 1) + [0.5]  # the last candidate: the kernel

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.GELU(), nn.Linear(32, 4)).eval()  # GELU not after a Linear
    ss.sparsify(model, 0.5)
    monkeypatch.setattr(planner, "interleaved_medians", kernel_faster)
    x = torch.randn(4, 16)
    dep = deploy(model, example_input=x, reps=2)
    assert type(dep[2]) is ops.GELU and dep[2].use_kernel and not dep[2].fused
    assert dep.semisparse_plan["ops"]["2"] == {"torch_us": 1e6, "kernel_us": 5e5, "kernel": "semisparse"}
    with torch.no_grad():
        torch.testing.assert_close(dep(x), model(x), rtol=1e-5, atol=1e-6)
