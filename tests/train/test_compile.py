"""``torch.compile`` with every sparsity mode: no graph break in the masked training forward, the same
numbers as eager, and the CLI's ``--compile`` failing with one line instead of silently running slower."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import semisparse as ss
from semisparse.masking import gumbel

MODES = ["sparse_2x4", "gumbel_2x4", "gumbel_2x4_padded", "rigl", "srigl", "srigl_2x4", "sr-ste"]


def small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.Linear(8 * 16, 8),
    )  # fmt: skip


def make(mode: str, seed: int = 0):
    """A small model in ``mode``, its optimizer and scheduler (the DST ones capture gradients at step 1)."""
    model = small(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = None
    if mode == "sparse_2x4":
        ss.sparsify(model, "2:4")
    elif mode.startswith("gumbel_2x4"):
        ss.sparsify(model, "2:4", method="gumbel", total_steps=10, trainable="all", pad=mode.endswith("padded"))
    elif mode == "rigl":
        sched = ss.RigL(model, opt, 0.5, t_end=100, delta=1)
    elif mode == "srigl":
        sched = ss.SRigL(model, opt, 0.5, t_end=100, delta=1)
    elif mode == "srigl_2x4":
        sched = ss.SRigL(model, opt, t_end=100, delta=1, pattern="2:4")
    else:
        sched = ss.SRSTE(model, opt)
    return model.train(), opt, sched


@pytest.mark.parametrize("mode", MODES)
def test_masked_training_forward_has_no_graph_break(mode, monkeypatch):
    monkeypatch.setattr(gumbel, "_BACKEND", {"name": "auto"})
    model, _, sched = make(mode)
    if sched is not None and hasattr(sched, "_accumulate"):
        assert sched._accumulate  # the gradient capture is part of the traced forward
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randn(2, 4, 4, 4))
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


def train(model, opt, sched, steps: int, x, y):
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("mode", ["gumbel_2x4", "rigl", "srigl"])
def test_compiled_training_equals_eager(mode, monkeypatch):
    """Three steps through AOTAutograd (``aot_eager``: the traced graphs, run by eager kernels, the same RNG
    stream) give the eager run's losses, masks, logits and schedule positions."""
    monkeypatch.setattr(gumbel, "_BACKEND", {"name": "torch"})
    x, y = torch.randn(4, 4, 4, 4), torch.randint(0, 8, (4,))
    runs = []
    for compiled in (False, True):
        model, opt, sched = make(mode)
        torch._dynamo.reset()
        fwd = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        torch.manual_seed(3)
        losses = train(fwd, opt, sched, 3, x, y)
        runs.append((losses, copy.deepcopy(model.state_dict()), ss.masks(model)))
    (l0, sd0, m0), (l1, sd1, m1) = runs
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert sd0.keys() == sd1.keys()
    for key in sd0:
        torch.testing.assert_close(sd1[key], sd0[key], rtol=1e-5, atol=1e-6, msg=key)
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    if mode == "gumbel_2x4":
        assert int(sd1["3.parametrizations.weight.0.step"]) == 3  # advanced by the compiled backward


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sparse_2x4", "gumbel_2x4", "rigl", "srigl", "sr-ste"])
def test_resnet18_compiles_with_inductor_in_every_mode(mode, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setattr(gumbel, "_BACKEND", {"name": "auto"})
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = None
    if mode == "sparse_2x4":
        ss.sparsify(model, "2:4")
    elif mode == "gumbel_2x4":
        ss.sparsify(model, "2:4", method="gumbel", total_steps=10)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    else:
        factory = {"rigl": ss.RigL, "srigl": ss.SRigL}.get(mode)
        sched = factory(model, opt, 0.9, t_end=100, delta=2) if factory else ss.SRSTE(model, opt)
    torch._dynamo.reset()
    compiled = torch.compile(model.train(), fullgraph=True)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    losses = train(compiled, opt, sched, 3, x, y)
    assert torch.isfinite(losses).all()
    ss.check(model)


def test_cli_compile_is_one_graph_or_a_one_line_error(monkeypatch, capsys):
    """``--compile`` asks for ``fullgraph=True``; when Dynamo refuses, the user gets one line, not a traceback
    and not a run that quietly falls back to eager pieces."""
    from semisparse.cli import main

    calls = []

    class Refused(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            raise torch._dynamo.exc.Unsupported("Tensor.tolist() with non-integer tensor\nmore detail")

    def fake_compile(model, **kw):
        calls.append(kw)
        return Refused(model)

    monkeypatch.setattr(torch, "compile", fake_compile)
    argv = ["train", "--device", "cpu", "--data-path", "digits", "-b", "256", "--epochs", "1", "--compile",
            "--sparsity", "gumbel_2x4", "--print-freq", "0"]  # fmt: skip
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("semisparse: warning:")]
    assert calls == [{"fullgraph": True}]
    assert len(err) == 1 and "--compile" in err[0] and "Tensor.tolist()" in err[0] and "drop --compile" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--sparsity", "sparse_2x4"], ["--sparsity", "gumbel_2x4"], ["--dst", "rigl"],
                                   ["--dst", "srigl"], ["--dst", "sr-ste"]])  # fmt: skip
def test_cli_compile_trains_in_every_sparsity_mode(flags, tmp_path):
    from semisparse.cli import main

    argv = ["train", "--device", "cpu", "--data-path", "digits", "-b", "256", "--epochs", "1", "--compile",
            "--print-freq", "0", "--output-dir", str(tmp_path), *flags]  # fmt: skip
    if flags[-1] in ("rigl", "srigl"):
        argv += ["--delta", "2"]
    torch._dynamo.reset()
    assert main(argv) == 0
    assert (tmp_path / "checkpoint.pth").exists()
