"""The CPU planner measures what a layer costs in the deployed model: bound kernel calls, repeated rounds under
noise, and the thread sizing of layers it keeps dense."""

from __future__ import annotations

import random
import statistics

import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy, deployed_layers
from semisparse.runtime.cpu import cpus, kernels, planner

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the planner times kernels: no C compiler here")


@needs_kernels
def test_planner_binds_each_condensed_candidate_once(monkeypatch):
    """Binding a batch-1 kernel call checks the indices (0.7 ms on a 3072->768 layer, 20x the call); the planner
    re-bound on every timed call, so it recorded the condensed layer at 500 us where the model runs it in 36-114."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8)).eval()
    ss.sparsify(model, 0.75)
    dep = deploy(model, plan="condensed")
    binds = []
    real = kernels.gemv_binding

    def counting(*args, **kw):
        binds.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(kernels, "gemv_binding", counting)
    planner.plan_layers(dep, torch.randn(1, 64), reps=20, budget_s=1e9)
    variants = len(kernels.GEMV_VARIANTS)
    assert 0 < len(binds) <= 2 * variants + 2  # once per layer and setting (and once more for the kept one)
    binds.clear()
    planner.plan_model(dep, torch.randn(1, 64), reps=20, budget_s=1e9)
    assert len(binds) <= 2 + 2 * sum(m.mode == "condensed" for _, m in deployed_layers(dep))
    with torch.no_grad():
        x = torch.randn(1, 64)
        torch.testing.assert_close(dep(x), model(x), rtol=1e-5, atol=1e-6)


def _noisy_timer(truth: dict[tuple[int, str], float], rng: random.Random):
    """A planner timer for a busy machine: each candidate's median over a round is its true time times a
    log-normal factor, and one round in four a spike makes one random candidate 3x slower."""

    def fake(fns, reps=20, warmup=2, budget_s=1.0):
        out = []
        spiked = rng.randrange(len(fns)) if rng.random() < 0.25 else -1
        for i, fn in enumerate(fns):
            y = fn()
            layer = [m for _, m in _layers if m.out_features == y.shape[-1]][0]
            t = truth[(y.shape[-1], layer.mode)] * rng.lognormvariate(0.0, 0.15)
            out.append(t * (3.0 if i == spiked else 1.0))
        return out

    return fake


_layers: list = []


@needs_kernels
def test_planner_fed_a_noisy_timer_picks_the_faster_form_in_repeated_runs(monkeypatch):
    """Layer 0's kernel is 1.3x faster than dense, layer 2's 1.3x slower: under noise and spikes every one of
    twenty plans picks the faster form, and the report says how sure each choice was."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16)).eval()
    ss.sparsify(model, 0.75)
    truth = {(24, "dense"): 1.3, (24, "condensed"): 1.0, (16, "dense"): 1.0, (16, "condensed"): 1.3}
    rng = random.Random(7)
    monkeypatch.setattr(planner, "interleaved_medians", _noisy_timer(truth, rng))
    spreads = []
    for _ in range(20):
        dep = deploy(model, plan="condensed")
        _layers[:] = deployed_layers(dep)
        planner.plan_layers(dep, torch.randn(1, 32))
        assert (dep[0].mode, dep[2].mode) == ("condensed", "dense"), (dep[0].figures, dep[2].figures)
        for layer in (dep[0], dep[2]):
            lo, hi = layer.figures["spread"]
            assert lo <= hi and layer.figures["rounds"] >= 3 and isinstance(layer.figures["sure"], bool)
            spreads.append(hi - lo)
    assert statistics.median(spreads) > 0  # the rounds differ under noise; the spread shows by how much
    row = {r.name: r for r in ss.report(dep, torch.randn(1, 32)).layers}["0.weight"]
    assert "spread" in row.extra and "sure" in row.extra


@needs_kernels
def test_rounds_that_disagree_are_measured_longer(monkeypatch):
    calls = []

    def fake(fns, reps=20, warmup=2, budget_s=1.0):  # rounds alternate: condensed wins, then dense
        calls.append(1)
        for fn in fns:
            fn()
        return [1.0] + [0.8 if len(calls) % 2 else 1.2] * (len(fns) - 1)

    torch.manual_seed(2)
    lin = nn.Linear(16, 8)
    ss.sparsify(lin, 0.5)
    dep = deploy(lin, plan="condensed")
    monkeypatch.setattr(planner, "interleaved_medians", fake)
    planner.plan_layers(dep, torch.randn(1, 16), rounds=3, max_rounds=7)
    assert len(calls) == 7 and dep.figures["rounds"] == 7 and dep.figures["sure"] is False


def test_layers_kept_dense_run_on_the_cpus_the_process_has(monkeypatch):
    """A layer the planner keeps dense is torch's own module; on a busy machine it must still run on the CPUs
    that are free, like the condensed layers (a kept dense Linear pinned to one CPU ran 7 ms, torch's stall)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    ss.sparsify(model, 0.5)

    def dense_wins(fns, reps=20, warmup=2, budget_s=1.0):
        for fn in fns:
            fn()
        return [1.0 + i for i in range(len(fns))]

    monkeypatch.setattr(planner, "interleaved_medians", dense_wins)
    dep = deploy(model, example_input=torch.randn(1, 16), reps=2)
    assert deployed_layers(dep) == []  # every layer is torch's own
    seen = []
    dep[0].register_forward_pre_hook(lambda mod, args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(cpus, "usable", lambda: 1)  # one CPU free
        with torch.no_grad():
            dep(torch.randn(1, 16))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _cl_fastest(fns, reps=20, warmup=2, budget_s=1.0):
    """A timer by which a channels-last output (torch's NHWC dense model) is the fastest, all else equal."""
    out = []
    for fn in fns:
        y = fn()
        nhwc = y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        out.append(1.0 if nhwc else 2.0)
    return out


def _equal_time(fns, reps=20, warmup=2, budget_s=1.0):
    for fn in fns:
        fn()
    return [1.0] * len(fns)


@pytest.mark.parametrize("cl_wins", [True, False])
def test_whole_model_check_compares_with_torchs_channels_last_dense(monkeypatch, cl_wins):
    """The bar a deployed CNN must pass is torch's strongest dense form on CPU, channels-last too: where that is
    faster, the deployed model becomes it (all dense, NHWC weights and input), computing the same."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    ss.sparsify(model, 0.5)
    x = torch.randn(1, 3, 10, 10)
    monkeypatch.setattr(planner, "interleaved_medians", _cl_fastest if cl_wins else _equal_time)
    dep = deploy(model, example_input=x, reps=2)
    plan = dep.semisparse_plan
    assert plan["dense_channels_last_ms"] == 1e3  # the fake timer: 1 s
    assert plan.get("channels_last", False) is cl_wins
    if cl_wins:
        assert deployed_layers(dep) == [] and dep[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert plan["deployed_ms"] == plan["dense_channels_last_ms"]
    with torch.no_grad():
        torch.testing.assert_close(dep(x), model(x), rtol=1e-5, atol=1e-5)
        x2 = torch.randn(2, 3, 7, 7)
        torch.testing.assert_close(dep(x2), model(x2), rtol=1e-5, atol=1e-5)
