"""`semisparse train` end to end: resume equals the uninterrupted run, bad input is one clear line."""

import json

import pytest
import torch

import semisparse as ss
from helpers.datasets import write_imagefolder
from semisparse.cli import main as cli_main


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def train(*argv):
    return cli_main(["train", "--device", "cpu", "--print-freq", "0", *argv])


def metrics(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("epoch_seconds")
    return rows


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


DIGITS = ["--data-path", "digits", "--sparsity", "sparse_2x4", "--lr", "0.05", "-b", "64", "--apex-verbosity", "0"]
# cosine schedule and EMA decay depend on --epochs (as in torchvision): resumed from an epoch of the same run
DIGITS_EMA = [*DIGITS, "--lr-scheduler", "cosineannealinglr", "--model-ema", "--model-ema-steps", "4"]


def test_resume_on_digits_repeats_the_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(*DIGITS, "--epochs", "2", "--output-dir", str(full)) == 0
    assert train(*DIGITS, "--epochs", "1", "--output-dir", str(part)) == 0
    assert train(*DIGITS, "--epochs", "2", "--output-dir", str(part), "--resume", str(part / "checkpoint.pth")) == 0
    assert metrics(full) == metrics(part)
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(part / "checkpoint.pth", weights_only=True)
    assert_same_state(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["lr_scheduler"] == b["lr_scheduler"] and a["epoch"] == b["epoch"] == 1 and a["step"] == b["step"]


def test_resume_from_an_earlier_epoch_rewrites_no_duplicate_metrics(tmp_path):
    out = tmp_path / "run"
    assert train(*DIGITS_EMA, "--epochs", "2", "--output-dir", str(out)) == 0
    before = metrics(out)
    first = torch.load(out / "checkpoint.pth", weights_only=True)
    assert train(*DIGITS_EMA, "--epochs", "2", "--output-dir", str(out), "--resume", str(out / "model_0.pth")) == 0
    after = metrics(out)
    assert [r["epoch"] for r in after] == [0, 1]
    assert after == before and "ema_val_acc1" in after[1]
    again = torch.load(out / "checkpoint.pth", weights_only=True)
    assert_same_state(first["model"], again["model"])
    assert_same_state(first["ema"], again["ema"])


def _effective_2_4(sd, key):
    prefix = key.split(".parametrizations.")[0]
    w = sd[f"{prefix}.parametrizations.weight.original"] * sd[f"{prefix}.parametrizations.weight.0.mask"]
    groups = w.permute(0, 2, 3, 1).reshape(-1, 4)  # 4 consecutive input channels at each kernel tap
    return bool(((groups != 0).sum(1) <= 2).all()), w


@pytest.mark.slow  # ~7 s quiet, 35 s on a loaded 2-core box; the digits resume test covers exactness by default
def test_resnet18_imagefolder_resume_is_exact_and_every_eligible_conv_is_2_4(tmp_path):
    data = write_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=4, size=32)
    common = ["--model", "resnet18", "--data-path", str(data), "--sparsity", "sparse_2x4", "-j", "0", "-b", "4",
              "--use-deterministic-algorithms", "--train-crop-size", "32", "--val-resize-size", "32",
              "--val-crop-size", "32", "--lr", "0.01"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(*common, "--epochs", "2", "--output-dir", str(full)) == 0
    assert train(*common, "--epochs", "1", "--output-dir", str(part)) == 0
    assert train(*common, "--epochs", "2", "--output-dir", str(part), "--resume", str(part / "checkpoint.pth")) == 0
    assert metrics(full) == metrics(part)
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(part / "checkpoint.pth", weights_only=True)
    assert_same_state(a["model"], b["model"])
    convs = [k for k, v in torch.load(full / "model_0.pth", weights_only=True)["model"].items()
             if k.endswith("weight.original") and v.dim() == 4]
    ref = torchvision_convs = [n for n, m in __import__("torchvision").models.resnet18().named_modules()
                                if isinstance(m, torch.nn.Conv2d) and m.in_channels % 4 == 0]
    assert len(convs) == len(torchvision_convs) == 19 and ref
    for key in convs:
        ok, w = _effective_2_4(a["model"], key)
        assert ok, key
        assert float((w == 0).float().mean()) >= 0.5
    assert set(a["sparsity"]["masks"]) == {k.replace(".parametrizations.weight.original", ".weight")
                                           for k in a["model"] if k.endswith("weight.original")}


# --- bad input: one line, non-zero exit, no traceback, no checkpoint overwritten ---------------------------


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    assert train("--data-path", "digits", "--epochs", "1", "--output-dir", str(out)) == 0
    return out


def _bad_cases(tmp, good):
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "corrupt.pth").write_bytes(b"\x00garbage" * 10)
    other = tmp / "other"
    if not other.exists():
        data = write_imagefolder(tmp / "img", size=16)
        assert train("--data-path", str(data), "--model", "resnet18", "--epochs", "1", "-j", "0",
                     "--train-crop-size", "16", "--val-resize-size", "16", "--val-crop-size", "16",
                     "--output-dir", str(other)) == 0
    base = ["--data-path", "digits", "--epochs", "2", "--output-dir", str(good)]
    return {
        "missing data": (["--data-path", str(tmp / "nope"), "--epochs", "1"], "not a directory"),
        "empty data": (["--data-path", str(tmp / "empty"), "--epochs", "1"], "ImageFolder"),
        "unknown model": (["--model", "resnet1800", "--epochs", "1"], "unknown model"),
        # another folder's checkpoint into `good` needs --overwrite; the run fails before `good` is touched
        "corrupt checkpoint": ([*base, "--overwrite", "--resume", str(tmp / "corrupt.pth")],
                               "cannot read checkpoint"),
        "other model": ([*base, "--overwrite", "--resume", str(other / "checkpoint.pth")], "is of model 'resnet18'"),
        "other sparsity": ([*base, "--sparsity", "sparse_2x4", "--resume", str(good / "checkpoint.pth")],
                           "trained with --sparsity none"),
        "other optimizer": ([*base, "--opt", "adamw", "--resume", str(good / "checkpoint.pth")],
                            "trained with --opt sgd; resume with the same flag (this run has adamw)"),
        "other scheduler": ([*base, "--lr-scheduler", "cosineannealinglr", "--resume", str(good / "checkpoint.pth")],
                            "trained with --lr-scheduler steplr"),
        "contradictory": ([*base, "--enable-apex", "--sparsity", "gumbel_2x4"], "contradicts"),
        "dst and gumbel": ([*base, "--dst", "rigl", "--sparsity", "gumbel_2x4"],
                           "--dst builds its own masks and cannot be combined"),
        "bad config": ([*base, "--config", str(tmp / "nope.yaml")], "does not exist"),
    }


@pytest.mark.parametrize("case", ["missing data", "empty data", "unknown model", "corrupt checkpoint",
                                  "other model", "other sparsity", "other optimizer",
                                  "other scheduler", "contradictory", "dst and gumbel", "bad config"])
def test_bad_input_is_one_line_and_keeps_the_checkpoint(case, good_run, tmp_path_factory, capsys):
    tmp = tmp_path_factory.getbasetemp() / "bad"
    tmp.mkdir(exist_ok=True)
    argv, message = _bad_cases(tmp, good_run)[case]
    before = (good_run / "checkpoint.pth").read_bytes()
    capsys.readouterr()
    rc = train(*argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err
    assert (good_run / "checkpoint.pth").read_bytes() == before


def test_debug_shows_the_traceback():
    with pytest.raises(ss.SemisparseError):
        cli_main(["train", "--model", "resnet1800", "--debug", "--epochs", "1"])
