"""``metrics.jsonl`` survives a kill at any moment: each checkpoint holds its epoch's line (written back on
resume when missing), and a damaged last line is dropped on resume with a one-line note, never a crash loop."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from helpers import paths
from semisparse.cli import main
from semisparse.errors import SemisparseError
from semisparse.train.metrics import MetricsLog, read_metrics

FAST = ["train", "--device", "cpu", "--data-path", "digits", "-b", "128", "--lr", "0.05", "--print-freq", "0"]
SRC = str(paths.SRC)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "run"
    assert main([*FAST, "--epochs", "2", "--output-dir", str(out)]) == 0
    return out


@pytest.fixture
def run(two_epochs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    return out


def lines(folder):
    return (folder / "metrics.jsonl").read_text().splitlines()


def test_each_checkpoint_holds_its_epochs_metrics_line(run):
    for epoch, line in enumerate(lines(run)):
        ckpt = torch.load(run / f"model_{epoch}.pth", weights_only=True)
        assert json.dumps(ckpt["metrics"]) == line


def test_a_line_lost_between_the_checkpoint_and_the_append_is_restored_on_resume(run, capsys):
    whole = lines(run)
    (run / "metrics.jsonl").write_text(whole[0] + "\n")  # killed after checkpoint.pth (epoch 1) was renamed
    capsys.readouterr()
    assert main([*FAST, "--epochs", "2", "--output-dir", str(run), "--resume", str(run / "checkpoint.pth")]) == 0
    assert "lacked epoch 1's line" in capsys.readouterr().err
    assert lines(run) == whole  # repaired at start-up, before any epoch (here none is left to train)


def test_the_first_epochs_line_is_restored_when_no_metrics_file_was_written(run):
    first = lines(run)[0]
    for name in ("metrics.jsonl", "model_1.pth", "checkpoint.pth"):
        os.remove(run / name)
    shutil.copy(run / "model_0.pth", run / "checkpoint.pth")  # killed before metrics.jsonl existed
    assert main([*FAST, "--epochs", "1", "--output-dir", str(run), "--resume", str(run / "checkpoint.pth")]) == 0
    assert lines(run) == [first]  # nothing to train, the line is back


@pytest.mark.parametrize("tail", ["half", "garbage"])
def test_a_damaged_last_line_is_dropped_with_a_note_and_the_resume_goes_on(run, capsys, tail):
    whole = lines(run)
    damaged = whole[1][: len(whole[1]) // 2] if tail == "half" else whole[1] + "}x"
    (run / "metrics.jsonl").write_text(whole[0] + "\n" + damaged + ("" if tail == "half" else "\n"))
    capsys.readouterr()
    epochs = 3 if tail == "half" else 2  # one more epoch: its line is appended after the repaired ones
    resume = ["--resume", str(run / "checkpoint.pth")]
    assert main([*FAST, "--epochs", str(epochs), "--output-dir", str(run), *resume]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "metrics.jsonl" in ln]
    assert any("line 2" in ln and "dropped it" in ln for ln in notes), notes
    now = lines(run)
    assert now[:2] == whole and [json.loads(x)["epoch"] for x in now] == list(range(epochs))  # 1: the checkpoint's
    with pytest.warns(UserWarning, match="line 2"):  # the library reader leaves such a line out too
        (run / "metrics.jsonl").write_text(whole[0] + "\n" + damaged)
        assert read_metrics(str(run)) == [json.loads(whole[0])]


def test_a_damaged_line_before_the_last_is_named_in_one_line(run, capsys):
    whole = lines(run)
    (run / "metrics.jsonl").write_text("{oops\n" + whole[1] + "\n")
    capsys.readouterr()
    assert main([*FAST, "--epochs", "3", "--output-dir", str(run), "--resume", str(run / "checkpoint.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{run / 'metrics.jsonl'}: line 1 is not a JSON record" in err, err
    with pytest.raises(SemisparseError, match="line 1"):
        read_metrics(str(run))


def test_appended_lines_are_whole_and_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        log = MetricsLog(str(tmp_path))
        log({"epoch": 0, "loss": float("nan")})
        log({"epoch": 1, "loss": 1.5})
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 0, "loss": "nan"}\n{"epoch": 1, "loss": 1.5}\n'
    assert os.stat(tmp_path / "metrics.jsonl").st_mode & 0o777 == 0o640


KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import semisparse.train.metrics as metrics
def killed(self, record):
    os.kill(os.getpid(), signal.SIGKILL)  # checkpoint.pth renamed, metrics line not yet written
metrics.MetricsLog.__call__ = killed
from semisparse.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a fresh interpreter
def test_a_run_killed_after_its_checkpoint_loses_no_metrics_line(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [*FAST, "--epochs", "1", "--output-dir", str(out)]
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, *argv], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / "metrics.jsonl").exists() and (out / "checkpoint.pth").exists()
    assert main([*FAST, "--epochs", "2", "--output-dir", str(out), "--resume", str(out / "checkpoint.pth")]) == 0
    assert [json.loads(x)["epoch"] for x in lines(out)] == [0, 1]


def test_a_checkpoint_record_that_is_not_json_is_not_restored(tmp_path):
    log = MetricsLog(str(tmp_path))
    log.start(2, restore={"epoch": 1, "loss": torch.ones(2)})  # a resealed file's junk: ignored
    assert not (tmp_path / "metrics.jsonl").exists()
    log.start(2, restore={"epoch": 1, "loss": float("inf")})
    assert lines(tmp_path) == ['{"epoch": 1, "loss": "inf"}']
