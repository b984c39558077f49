"""A deployed model runs a batch sample by sample where the planner measured that faster (its activations stay in
cache), and only where that computes what the whole batch computes."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy, deployed_layers
from semisparse.runtime.cpu import batches, build, kernels, planner

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler: fast kernels unavailable")


def _cnn() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8)).eval()
    ss.sparsify(model, 0.75)
    return model


def _timer(per_sample_s: float):
    """A fake ``interleaved_medians``: every candidate 1 s, the per-sample run ``per_sample_s``."""
    def fake(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5, **kw):
        for fn in fns:
            fn()
        return [per_sample_s if getattr(fn, "__name__", "") == "per_sample" else 1.0 for fn in fns]
    return fake


@needs_kernels
@pytest.mark.parametrize("faster", [True, False])
def test_a_batch_runs_sample_by_sample_only_where_measured_faster(monkeypatch, faster):
    model = _cnn()
    x = torch.randn(4, 3, 12, 12)
    planned = []
    real = build.plan_layers
    monkeypatch.setattr(build, "plan_layers", lambda m, xx, **kw: (planned.append(tuple(xx.shape)), real(m, xx, **kw)))
    monkeypatch.setattr(planner, "interleaved_medians", _timer(0.5 if faster else 1.5))
    dep = deploy(model, example_input=x, reps=2)
    batch = dep.semisparse_plan["batch"]
    assert batch["per_sample"] is faster and (batches.installed(dep) is not None) is faster
    assert batch["whole_ms"] == 1e3 and batch["per_sample_ms"] == (500.0 if faster else 1500.0)
    # planned at one sample; planned again at the whole batch where whole batches are faster
    assert planned == ([(1, 3, 12, 12)] if faster else [(1, 3, 12, 12), (4, 3, 12, 12)])
    notes = " ".join(ss.report(dep).notes)
    assert ("sample by sample" in notes) is faster

    calls = []
    cls_forward = type(dep).forward
    monkeypatch.setattr(type(dep), "forward", lambda self, inp: (calls.append(inp.shape[0]), cls_forward(self, inp))[1])
    with torch.no_grad():
        for n in (4, 3, 1):
            xn = torch.randn(n, 3, 12, 12)
            want = model(xn)  # an nn.Sequential too: counted before the deployed model's calls
            calls.clear()
            torch.testing.assert_close(dep(xn), want, rtol=1e-5, atol=1e-5)
            assert calls == ([1] * n if faster else [n])
        if faster:  # a hook added after the deploy, or training mode: whole batches again
            seen = []
            h = dep[0].register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
            calls.clear()
            dep(x)
            assert calls == [4] and seen == [4]
            h.remove()
            dep.train()
            calls.clear()
            dep(x)
            assert calls == [4]
            dep.eval()
            calls.clear()
            dep(x)
            assert calls == [1] * 4


@needs_kernels
def test_sample_by_sample_is_refused_where_samples_mix():
    """A model that mixes the samples of a batch (here: subtracts the batch mean) computes something else one
    sample at a time: the planner sees the outputs differ and keeps whole batches, whatever the timing."""

    class BatchCentred(nn.Module):  # slightly: a difference of ~1e-4 of the output must be seen too
        def forward(self, x):
            return x - 1e-3 * x.mean(0, keepdim=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchCentred(), nn.Conv2d(8, 4, 1)).eval()
    ss.sparsify(model, 0.5)
    x = torch.randn(4, 3, 8, 8)
    dep = deploy(model, example_input=x, reps=2)
    batch = dep.semisparse_plan["batch"]
    assert batch["per_sample"] is False and "differs" in batch["why"] and "the batch" in batch["why"]
    assert batches.installed(dep) is None
    with torch.no_grad():
        torch.testing.assert_close(dep(x), model(x), rtol=1e-5, atol=1e-5)


def test_why_not_split_names_what_rules_it_out():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 4, 4)
    assert batches.why_not_split(model, x) == ""
    assert "batch of 2 or more" in batches.why_not_split(model, x[:1])
    assert "3+ dimensions" in batches.why_not_split(model, torch.randn(8, 3))
    assert "one tensor" in batches.why_not_split(model, (x, x))
    h = model[0].register_forward_hook(lambda *a: None)
    assert batches.why_not_split(model, x) == "0 has forward hooks (they would see one sample at a time)"
    h.remove()
    model[1].train()
    assert "1 normalises with batch statistics" in batches.why_not_split(model, x)
    model[1].eval()
    model[1].track_running_stats = False
    assert "batch statistics" in batches.why_not_split(model, x)
    model[1].track_running_stats = True
    model.forward = model.forward
    assert "forward is set on the instance" in batches.why_not_split(model, x)


def test_outputs_not_stacked_by_sample_run_the_whole_batch():
    """Whatever the plan saw, an input or output the loop cannot split and join runs the class's forward."""

    class Pair(nn.Module):
        def forward(self, x, scale=1.0):
            return {"sum": x.sum() * scale}

    m = Pair()
    batches.install(m)
    x = torch.randn(3, 2, 4)
    assert torch.equal(m(x)["sum"], x.sum())
    assert torch.equal(m(x, scale=2.0)["sum"], 2 * x.sum())  # keywords: never split


@needs_kernels
def test_a_split_model_copies_pickles_scripts_and_traces(monkeypatch):
    model = _cnn()
    x = torch.randn(3, 3, 12, 12)
    monkeypatch.setattr(planner, "interleaved_medians", _timer(0.5))

    def condensed_faster(fns, nd, *args, **kw):  # every layer's condensed candidates win
        for fn in fns:
            fn()
        return [{i: 1.0 if i < nd else 0.5 for i in range(len(fns))}]

    monkeypatch.setattr(planner, "_timed_rounds", condensed_faster)
    dep = deploy(model, example_input=x, reps=2)
    assert batches.installed(dep) is not None
    with torch.no_grad():
        want = model(x)
        twin = copy.deepcopy(dep)
        assert batches.installed(twin).model is twin  # the copy's loop runs the copy
        buf = io.BytesIO()
        torch.save(dep, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert batches.installed(loaded).model is loaded
        for m in (twin, loaded, torch.jit.script(dep), torch.jit.trace(dep, x, check_trace=False)):
            torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    assert batches.installed(dep).model is dep and deployed_layers(dep)
