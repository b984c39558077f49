"""The CPU planner measures what a layer costs in the deployed model: bound kernel calls, repeated rounds under
noise, and the thread sizing of layers it keeps dense."""

from __future__ import annotations

import copy
import io
import random
import statistics
import sys

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

    def fake(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):
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


def _wrong_plans(prune: float | None, plans: int, seed: int) -> tuple[int, list[float]]:
    """How many of ``plans`` plans of a two-layer model, timed by :func:`_noisy_timer`, pick a slower form."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16)).eval()
    ss.sparsify(model, 0.75)
    # layer 0's kernel is 1.3x faster than dense, layer 2's 1.3x slower
    truth = {(24, "dense"): 1.3, (24, "condensed"): 1.0, (16, "dense"): 1.0, (16, "condensed"): 1.3}
    rng = random.Random(seed)
    planned = deploy(model, plan="condensed")
    wrong, spreads = 0, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planner, "interleaved_medians", _noisy_timer(truth, rng))
        for _ in range(plans):
            dep = copy.deepcopy(planned)
            _layers[:] = deployed_layers(dep)
            planner.plan_layers(dep, torch.randn(1, 32), prune=prune)
            wrong += (dep[0].mode, dep[2].mode) != ("condensed", "dense")
            for layer in (dep[0], dep[2]):
                lo, hi = layer.figures["spread"]
                assert lo <= hi and layer.figures["rounds"] >= 3 and isinstance(layer.figures["sure"], bool)
                spreads.append(hi - lo)
    return wrong, spreads


@needs_kernels
def test_planner_fed_a_noisy_timer_picks_the_faster_form_in_repeated_runs():
    """Layer 0's kernel is 1.3x faster than dense, layer 2's 1.3x slower: under log-normal noise and 3x spikes
    (one round in four), at most 5% of 200 plans pick a slower form (measured over 600 plans: 2.5% with
    the candidates far behind left out after the first round, 3.3% timing every candidate every round), and
    leaving those candidates out is not less sure than timing them all; the report says how sure each choice was."""
    wrong, spreads = _wrong_plans(1.25, 200, seed=7)
    wrong_all, _ = _wrong_plans(None, 200, seed=7)
    assert wrong <= 10 and wrong <= wrong_all + 4, (wrong, wrong_all)
    assert statistics.median(spreads) > 0  # the rounds differ under noise; the spread shows by how much
    one = nn.Sequential(nn.Linear(32, 24)).eval()
    ss.sparsify(one, 0.75)
    dep = deploy(one, plan="condensed")
    planner.plan_layers(dep, torch.randn(1, 32), reps=3, budget_s=0.01)
    row = {r.name: r for r in ss.report(dep, torch.randn(1, 32)).layers}["0.weight"]
    assert "spread" in row.extra and "sure" in row.extra and "timed" in row.extra


def _condensed_linear() -> nn.Module:
    """A 50%-sparse Linear 16 -> 8 deployed condensed, unplanned."""
    torch.manual_seed(2)
    lin = nn.Linear(16, 8)
    ss.sparsify(lin, 0.5)
    return deploy(lin, plan="condensed")


@needs_kernels
def test_the_first_round_only_ranks_and_gets_a_third_of_a_later_rounds_budget(monkeypatch):
    """ViT-B/16's Linears take 4-6 ms a call: 8 candidates x 20 calls made the first round half of a 100 s plan.
    The first round (every candidate) runs on a third of the time budget of the rounds after it."""
    budgets = []

    def fake(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):
        budgets.append((len(fns), budget_s))
        for fn in fns:
            fn()
        return [1.0] + [0.5 + 0.01 * i for i in range(len(fns) - 1)]

    dep = _condensed_linear()
    monkeypatch.setattr(planner, "interleaved_medians", fake)
    planner.plan_layers(dep, torch.randn(1, 16), budget_s=0.6, rounds=3)
    (_, first), *later = budgets
    assert len(later) == 2
    assert first == pytest.approx(0.2 / 3) and all(b == pytest.approx(0.2) for _, b in later)
    budgets.clear()
    planner.plan_layers(dep, torch.randn(1, 16), budget_s=0.6, rounds=3, first_share=1.0)
    assert budgets[0][1] == pytest.approx(0.2)


@needs_kernels
def test_rounds_that_disagree_are_measured_longer(monkeypatch):
    calls = []

    def fake(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):  # rounds alternate: condensed wins, then dense
        calls.append(1)
        for fn in fns:
            fn()
        return [1.0] + [0.8 if len(calls) % 2 else 1.2] * (len(fns) - 1)

    dep = _condensed_linear()
    monkeypatch.setattr(planner, "interleaved_medians", fake)
    planner.plan_layers(dep, torch.randn(1, 16), rounds=3, max_rounds=7)
    assert len(calls) == 7 and dep.figures["rounds"] == 7 and dep.figures["sure"] is False


def test_layers_kept_dense_run_on_the_cpus_the_process_has(monkeypatch):
    """A layer the planner keeps dense is torch's own module; on a busy machine it must still run on the CPUs
    that are free, like the condensed layers (a kept dense Linear pinned to one CPU ran 7 ms, torch's stall)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    ss.sparsify(model, 0.5)

    def dense_wins(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):
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


def _cl_fastest(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):
    """A timer by which a channels-last output (torch's NHWC dense model) is the fastest, all else equal."""
    out = []
    for fn in fns:
        y = fn()
        nhwc = y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        out.append(1.0 if nhwc else 2.0)
    return out


def _equal_time(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):
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


@needs_kernels
@pytest.mark.parametrize(("prune", "second", "kept_sparse"), [(1.25, 0.55, 2), (1.25, 0.7, 1), (None, 0.55, None)])
def test_only_the_two_fastest_of_each_side_are_timed_after_the_first_round(monkeypatch, prune, second,
                                                                           kept_sparse):
    """At batch 32 a layer's call takes 10-100 ms and the planner timed all 8 candidates of each of ResNet-50's
    53 layers in every round (509 s). After the first round only the two fastest of each side are timed again,
    the second only if within ``prune`` of the first, with one warm-up call instead of two; the choice stays
    the fastest candidate."""
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    ss.sparsify(conv, 0.5)
    dep = deploy(conv, plan="condensed")
    x = torch.randn(1, 8, 6, 6)
    settings = dep.variants(x)
    n_dense, n_sparse = len(dep.dense_variants(x)), len(settings)
    # dense (torch's conv) 1.0; condensed settings 0.5, ``second``, then 1.5, 2.0, ...: far behind the best
    times = [0.5, second] + [1.5 + 0.5 * i for i in range(n_sparse - 2)]
    calls = []

    def fake(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):
        calls.append((len(fns), warmup))
        out = []
        for fn in fns:
            fn()  # the candidate leaves its mode and setting on the layer
            now = {k: getattr(dep, k) for k in settings[0]}
            out.append(1.0 if dep.mode == "dense" else times[settings.index(now)])
        return out

    monkeypatch.setattr(planner, "interleaved_medians", fake)
    planner.plan_layers(dep, x, prune=prune)
    everyone = n_dense + n_sparse
    assert n_dense == 1 and calls[0] == (everyone, 2) and len(calls) == 3
    kept = everyone if prune is None else n_dense + kept_sparse  # torch's conv is its side's best: it stays
    assert [n for n, _ in calls[1:]] == [kept, kept] and all(w == 1 for _, w in calls[1:])
    assert dep.figures["timed"] == [everyone, kept, kept]
    assert dep.mode == "condensed" and dep.figures["sparse_us"] == 0.5e6
    assert {k: getattr(dep, k) for k in settings[0]} == settings[0]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@needs_kernels
@pytest.mark.parametrize("terminal", [True, False])
def test_planning_shows_a_progress_bar_on_a_terminal_only(monkeypatch, terminal):
    """Planning takes 25 s at batch 1 and minutes at batch 32: on a terminal a bar counts the layers timed; in a
    log, a pipe or a test run it writes nothing."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="condensed")
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(planner, "interleaved_medians", _equal_time)
    planner.plan_layers(dep, torch.randn(1, 16))
    assert ("semisparse: timing layers" in err.getvalue()) is terminal
    assert terminal or err.getvalue() == ""
