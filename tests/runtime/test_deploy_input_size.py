"""ss.deploy plans at the input size the model was trained at: files and checkpoints record it, a guess is said
in one line, and ss.report shows the planned shape and flags counting at another."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse.runtime.cpu import planner
from semisparse.train.checkpoint import atomic_save, load_training_checkpoint
from semisparse.train.engine import checkpoint_dict


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


def _quick(monkeypatch):
    def first_wins(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):  # the planner's timing, none of its cost
        for fn in fns:
            fn()
        return [1.0 + i for i in range(len(fns))]

    monkeypatch.setattr(planner, "interleaved_medians", first_wins)


def test_file_records_the_input_size_and_deploy_plans_there(tmp_path, monkeypatch):
    """A 32x32 model deployed from its file was planned at 224x224 (70 s instead of 4.6 s), silently."""
    _quick(monkeypatch)
    model = _net()
    ss.sparsify(model, 0.5)
    model.semisparse_input_size = [3, 12, 12]
    path = ss.save(model, tmp_path / "m.safetensors")
    loaded = ss.load(path, model=_net())
    assert loaded.semisparse_input_size == [3, 12, 12]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recorded: nothing guessed, nothing to warn about
        dep = ss.deploy(loaded, reps=2)
    assert dep.semisparse_plan["input_shape"] == [1, 3, 12, 12]
    assert ss.deploy(loaded, batch_size=2, reps=2).semisparse_plan["input_shape"] == [2, 3, 12, 12]


def test_deploy_without_a_recorded_size_says_it_guessed(monkeypatch):
    _quick(monkeypatch)
    model = _net()
    ss.sparsify(model, 0.5)
    with pytest.warns(UserWarning, match=r"records no input size; planning at \(1, 3, 224, 224\) \(a guess\)") as rec:
        dep = ss.deploy(model, reps=2)
    assert len([w for w in rec if "a guess" in str(w.message)]) == 1
    assert "\n" not in str(rec[0].message)
    assert dep.semisparse_plan["input_shape"] == [1, 3, 224, 224]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example input: nothing guessed
        ss.deploy(model, example_input=torch.randn(1, 3, 10, 10), reps=2)


def test_training_checkpoint_records_the_input_size(tmp_path):
    model = _net()
    ss.sparsify(model, 0.5)
    model.semisparse_input_size = [3, 16, 16]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = checkpoint_dict(model, opt, None, 0, 1)
    assert ckpt["input_size"] == [3, 16, 16]
    atomic_save(ckpt, str(tmp_path / "checkpoint.pth"))
    back, _ = load_training_checkpoint(tmp_path / "checkpoint.pth", model=_net())
    assert back.semisparse_input_size == [3, 16, 16]


def test_report_shows_the_planned_shape_and_warns_at_another(monkeypatch):
    """ss.report(fast, x) mixed MACs at 32x32 with timings at 224x224, with nothing said."""
    _quick(monkeypatch)
    model = _net()
    ss.sparsify(model, 0.5)
    dep = ss.deploy(model, example_input=torch.randn(1, 3, 12, 12), reps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = str(ss.report(dep, torch.randn(1, 3, 12, 12)))
    assert "planned (timed) at input 1x3x12x12" in text
    with pytest.warns(UserWarning, match="MACs counted at input 1x3x20x20 but the model was planned"):
        rep = ss.report(dep, torch.randn(1, 3, 20, 20))
    assert any(n.startswith("warning: MACs counted at input 1x3x20x20") for n in rep.notes)


@pytest.mark.slow  # a training epoch on the digits (about 10 s on a quiet machine)
def test_train_records_the_size_it_validates_at_through_export(tmp_path, monkeypatch):
    """`semisparse train` -> checkpoint -> `semisparse export` -> ss.load: the file says 1x8x8 (digits), and
    ss.deploy plans there without a guess."""
    from semisparse.cli import main

    out = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--data-path", "digits", "-b", "256", "--epochs", "1",
                 "--sparsity", "sparse_2x4", "--output-dir", str(out)]) == 0
    back, _ = load_training_checkpoint(out / "checkpoint.pth")
    assert back.semisparse_input_size == [1, 8, 8]
    assert main(["export", str(out / "checkpoint.pth"), "-o", str(tmp_path / "m.safetensors")]) == 0
    loaded = ss.load(tmp_path / "m.safetensors")
    assert loaded.semisparse_input_size == [1, 8, 8]
    _quick(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        dep = ss.deploy(loaded, reps=2)
    assert dep.semisparse_plan["input_shape"] == [1, 1, 8, 8]
