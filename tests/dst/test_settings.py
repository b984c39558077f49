"""DSTSettings: every default and check of sparse training once, read by the Python API, from_flags, the CLI and
the checkpoint; a bad value is one line naming the argument (or its flag) and the range it must lie in."""

import collections
import inspect
import math

import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse.cli import main
from semisparse.cli import train as cli_train
from semisparse.dst import DSTSettings, LayerSelection, checks, from_flags
from semisparse.io.digest import seal
from semisparse.train.checkpoint import load_checkpoint


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def test_the_factories_defaults_are_the_settings_fields():
    for factory in (ss.RigL, ss.SRigL, ss.SRSTE):
        for name, p in inspect.signature(factory).parameters.items():
            if hasattr(DSTSettings, name) and p.default is not inspect.Parameter.empty and name != "pattern":
                assert p.default == getattr(DSTSettings, name), (factory.__name__, name)
    assert DSTSettings().delta == 100 and DSTSettings().t_end_fraction == 0.75


def test_t_end_is_a_step_and_t_end_fraction_a_share_of_the_run():
    a, b, c = tiny(), tiny(), tiny()
    by_share = DSTSettings("rigl", t_end_fraction=0.5).build(a, torch.optim.SGD(a.parameters(), lr=0.1), 200)
    by_step = ss.RigL(b, torch.optim.SGD(b.parameters(), lr=0.1), t_end=100)
    assert by_share.schedule == by_step.schedule and by_share.schedule.t_end == 100
    assert from_flags(c, torch.optim.SGD(c.parameters(), lr=0.1), "rigl", 200, t_end=0.5).schedule.t_end == 100
    with pytest.raises(ss.SemisparseError, match="t_end is required"):
        ss.RigL(tiny(), torch.optim.SGD(tiny().parameters(), lr=0.1))


BAD = [
    ({"method": "set"}, "method must be one of rigl, srigl, sr-ste, static", "--dst"),
    ({"sparsity": 1.5}, "sparsity must be a number in (0, 1)", "--sparsity-level"),
    ({"sparsity": "0.9"}, "sparsity must be a number in (0, 1)", "--sparsity-level"),
    ({"delta": 0}, "delta must be an int in [1, 2147483648]", "--delta"),
    ({"alpha": -0.1}, "alpha must be a number in [0, 1]", "--alpha"),
    ({"t_end_fraction": 0.0}, "t_end_fraction must be a number in (0, 1]", "--t-end"),
    ({"t_end": 0}, "t_end must be an int >= 1", None),
    ({"distribution": "normal"}, "distribution must be one of erk, uniform", "--distribution"),
    ({"method": "srigl", "ablation": math.nan}, "ablation must be a number in [0, 1]", "--ablation"),
]


@pytest.mark.parametrize(("kw", "message", "flag"), BAD)
def test_a_bad_value_is_one_line_naming_the_argument_and_its_range(kw, message, flag):
    with pytest.raises(checks.ArgumentError) as info:
        DSTSettings(**kw)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ss.SemisparseError)


FLAG_VALUES = {"--dst": "set", "--sparsity-level": "1.5", "--delta": "0", "--alpha": "-0.1", "--t-end": "0",
               "--distribution": "normal", "--ablation": "nan"}
RANGE_OF = {flag: message.split(" must be ")[1] for _, message, flag in BAD if flag}


@pytest.mark.parametrize("flag", sorted(FLAG_VALUES))
def test_the_cli_names_the_flag_and_the_same_range_before_any_work(flag, capsys, monkeypatch):
    monkeypatch.setattr(cli_train, "setup", lambda *a: pytest.fail("a bad --dst value reached setup"))
    dst = [] if flag == "--dst" else ["--dst", "srigl"]
    capsys.readouterr()
    assert main(["train", "--device", "cpu", "--epochs", "1", *dst, flag, FLAG_VALUES[flag]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{flag} must be {RANGE_OF[flag]}" in err, err


def test_each_value_is_checked_once_from_argparse_to_the_layer_budget(monkeypatch):
    seen = collections.Counter()
    number, choice = checks.number, checks.choice
    monkeypatch.setattr(checks, "number", lambda name, *a, **k: seen.update([name]) or number(name, *a, **k))
    monkeypatch.setattr(checks, "choice", lambda name, *a, **k: seen.update([name]) or choice(name, *a, **k))
    args = cli_train.validate(cli_train.parse_args(["--device", "cpu", "--epochs", "1", "-j", "0", "--dst", "srigl",
                                                    "--sparsity-level", "0.8", "--print-freq", "0"]))
    run = cli_train.setup(args)
    assert run.sparsity.dst.sparsity == 0.8 and run.sparsity.config.dst.budget.sparsity == 0.8
    for name in ("method", "sparsity", "distribution", "delta", "alpha", "t_end_fraction", "ablation", "t_end"):
        assert seen[name] == 1, (name, seen)


def test_layer_selection_is_one_object_shared_by_every_method():
    sel = LayerSelection(exclude="5", dense_layers=["3"])
    assert sel.exclude == ("5",) and sel.dense_layers == ("3",) and sel.include is None
    m1, m2 = tiny(), tiny()
    ss.SRigL(m1, torch.optim.SGD(m1.parameters(), lr=0.1), 0.5, t_end=10, exclude="5")
    DSTSettings("srigl", 0.5, t_end=10, layers=LayerSelection(exclude="5")).build(
        m2, torch.optim.SGD(m2.parameters(), lr=0.1))
    a, b = ss.masks(m1), ss.masks(m2)
    assert set(a) == set(b) == {"0.weight", "3.weight"} and all(torch.equal(a[k], b[k]) for k in a)
    m3 = tiny()
    ss.SRSTE(m3, torch.optim.SGD(m3.parameters(), lr=0.1), dense_layers="first")
    assert set(ss.masks(m3)) == {"3.weight", "5.weight"}


def test_a_checkpoint_with_the_older_flat_config_entry_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--device", "cpu", "--print-freq", "0", "-b", "256", "--lr", "0.05", "--dst", "srigl",
            "--delta", "2", "--sparsity-level", "0.8"]
    assert main([*base, "--epochs", "1", "--output-dir", str(out)]) == 0
    ckpt = load_checkpoint(str(out / "checkpoint.pth"))
    state = ckpt["sparsity"]["state"]
    assert state["config"]["dst"]["method"] == "srigl"
    # the entry as written before DSTSettings: the flags' spellings, flat
    state["config"] = {"method": "none", "pattern": None, "trainable": "all", "tau": None, "prior": None,
                       "prior_from": None, "permute": False, "pad": False, "ignore_linear": False,
                       "ignore_grouped": False, "exclude": [], "dst": "srigl", "level": 0.8, "delta": 2, "alpha": 0.3,
                       "t_end": 0.75, "distribution": "erk", "ablation": None, "dense_layers": [], "seed": 0}
    torch.save(seal({k: v for k, v in ckpt.items()}), out / "checkpoint.pth")
    capsys.readouterr()
    assert main(["train", "--device", "cpu", "--print-freq", "0", "--epochs", "2", "--resume",
                 str(out / "checkpoint.pth"), "--output-dir", str(out)]) == 0
    resumed = load_checkpoint(str(out / "checkpoint.pth"))
    assert resumed["epoch"] == 1 and resumed["sparsity"]["state"]["dst"]["step"] == resumed["step"] > ckpt["step"]
    assert resumed["sparsity"]["state"]["dst"]["schedule"]["delta"] == state["dst"]["schedule"]["delta"] == 2
