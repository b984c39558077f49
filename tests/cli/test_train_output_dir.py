"""`semisparse train --output-dir`: one run per folder; nothing of the previous run is lost before the new
run's first checkpoint is written (a refused, failing, interrupted or killed run leaves it byte-identical)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import semisparse.train.engine as engine
import semisparse.train.run_folder as run_folder
from helpers import paths
from semisparse.cli import main

FAST = ["train", "--device", "cpu", "--data-path", "digits", "-b", "128", "--lr", "0.05", "--print-freq", "0"]
SRC = str(paths.SRC)


def snapshot(folder):
    """Every file's bytes (TensorBoard's event files aside: a new run adds its own beside the old ones; the
    lock file aside: a live run holds one)."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            rel = os.path.relpath(path, folder)
            if not rel.startswith("tensorboard") and rel != run_folder.LOCK_NAME:
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


def epochs_of(folder):
    return [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A finished two-epoch run (model_0, model_1, checkpoint, two metrics lines)."""
    out = tmp_path_factory.mktemp("old") / "run"
    assert main([*FAST, "--epochs", "2", "--output-dir", str(out)]) == 0
    return out


@pytest.fixture
def previous(old_run, tmp_path):
    """A private copy of the old run's folder, and its bytes."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(old_run, out)
    return out, snapshot(out)


def test_a_fresh_run_into_another_runs_folder_is_refused_and_changes_nothing(previous, capsys):
    out, before = previous
    capsys.readouterr()
    assert main([*FAST, "--epochs", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"--resume {out / 'checkpoint.pth'}" in err and "--overwrite" in err and "metrics.jsonl" in err
    assert snapshot(out) == before


def test_resume_of_another_folders_run_into_this_one_is_refused(previous, tmp_path, capsys):
    out, before = previous
    other = tmp_path / "other"  # refused before the checkpoint is read: it need not exist
    capsys.readouterr()
    assert main([*FAST, "--epochs", "2", "--output-dir", str(out), "--resume", str(other / "checkpoint.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not the run of --resume" in err and "--overwrite" in err, err
    assert snapshot(out) == before


@pytest.mark.parametrize("failure", [RuntimeError("a failing run"), KeyboardInterrupt()])
def test_a_failing_or_interrupted_overwrite_run_leaves_the_previous_files_byte_identical(
        failure, previous, monkeypatch, capsys):  # fmt: skip
    out, before = previous
    capsys.readouterr()

    def fail(*a, **kw):
        raise failure

    monkeypatch.setattr(engine, "train_one_epoch", fail)
    rc = main([*FAST, "--epochs", "1", "--output-dir", str(out), "--overwrite"])
    assert rc == (130 if isinstance(failure, KeyboardInterrupt) else 1)
    assert ("interrupted" if isinstance(failure, KeyboardInterrupt) else "a failing run") in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_failing_resume_keeps_the_metrics_history(previous, monkeypatch, capsys):
    out, before = previous
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **kw: 1 / 0)
    capsys.readouterr()
    assert main([*FAST, "--epochs", "2", "--output-dir", str(out), "--resume", str(out / "model_0.pth")]) == 1
    assert "ZeroDivisionError" in capsys.readouterr().err
    assert snapshot(out) == before  # the redone epoch's line is dropped only when its new line is written


def test_overwrite_touches_nothing_before_the_new_checkpoint_then_replaces_the_old_run(previous, monkeypatch):
    out, before = previous
    (out / "tensorboard").mkdir(exist_ok=True)
    (out / "tensorboard" / "events.out.tfevents.1.old-run").write_bytes(b"old curves")
    old_events = set(os.listdir(out / "tensorboard"))
    seen = []
    real = run_folder.atomic_save

    def spy(obj, path):  # the folder as a kill just before each write would leave it
        seen.append((os.path.basename(path), snapshot(out)))
        real(obj, path)

    monkeypatch.setattr(run_folder, "atomic_save", spy)
    assert main([*FAST, "--epochs", "1", "--seed", "7", "--output-dir", str(out), "--overwrite"]) == 0
    assert seen[0] == ("checkpoint.pth", before)  # the commit: everything of the old run still there
    assert seen[1][0] == "model_0.pth" and set(seen[1][1]) == {"checkpoint.pth"}  # old model_N, metrics gone
    assert set(snapshot(out)) == {"checkpoint.pth", "model_0.pth", "metrics.jsonl"}  # no stale model_1
    assert epochs_of(out) == [0]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["seed"] == 7 and ckpt["epoch"] == 0
    assert old_events.isdisjoint(os.listdir(out / "tensorboard"))  # the old run's curves are gone too
    # the replaced folder is an ordinary run folder: it resumes, keeping its own history
    assert main([*FAST, "--epochs", "2", "--seed", "7", "--output-dir", str(out),
                 "--resume", str(out / "checkpoint.pth")]) == 0  # fmt: skip
    assert epochs_of(out) == [0, 1]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporary_files_of_killed_saves_are_removed_unless_their_process_lives(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = _dead_pid()
    stale = [f".checkpoint.pth.{dead}.k2x_9q0a.tmp", f".model_3.pth.{dead}.a1b2c3d4.tmp",  # atomic_write's names
             f"metrics.jsonl.tmp{dead}", f".checkpoint.pth.tmp{dead}"]  # MetricsLog's; earlier versions' # fmt: skip
    live = [f".checkpoint.pth.{os.getppid()}.zz0_1234.tmp", f".checkpoint.pth.tmp{os.getppid()}"]
    other = [f".notes.txt.{dead}.abcdefgh.tmp", "notes.txt"]  # not a run file's: not ours to remove
    for name in [*stale, *live, *other]:
        (out / name).write_bytes(b"partial")
    assert main([*FAST, "--epochs", "1", "--output-dir", str(out)]) == 0
    names = set(os.listdir(out))
    assert not names & set(stale) and {*live, *other, "checkpoint.pth"} <= names


KILL_AT_FIRST_RENAME = """
import os, signal, sys
import semisparse.io.files as files
real = os.replace
def replace(src, dst):
    if os.path.basename(dst).endswith('.pth'):
        os.kill(os.getpid(), signal.SIGKILL)  # killed with the temporary file written, before its rename
    return real(src, dst)
files.os = type(sys)('os_spy')
files.os.__dict__.update(os.__dict__)
files.os.replace = replace
from semisparse.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a fresh interpreter: a few seconds under load
def test_a_killed_overwrite_run_leaves_the_previous_files_and_the_next_run_cleans_up(previous):
    out, before = previous
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [*FAST, "--epochs", "1", "--output-dir", str(out), "--overwrite"]
    proc = subprocess.Popen([sys.executable, "-c", KILL_AT_FIRST_RENAME, *argv], env=env, stderr=subprocess.PIPE)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    left = set(snapshot(out)) - set(before)
    assert len(left) == 1  # the killed save's partial file, named with the killed process's pid
    assert run_folder.TEMP_NAME.fullmatch(left.pop()).groups() == ("checkpoint.pth", str(proc.pid))
    assert {k: v for k, v in snapshot(out).items() if k in before} == before
    assert main(argv) == 0
    assert set(snapshot(out)) == {"checkpoint.pth", "model_0.pth", "metrics.jsonl"} and epochs_of(out) == [0]


IMG = ["train", "--device", "cpu", "--model", "digits_cnn", "-b", "2", "--lr", "0.01", "--print-freq", "0",
       "--train-crop-size", "16", "--val-resize-size", "16", "--val-crop-size", "16"]


def test_a_run_stopped_by_a_corrupt_image_leaves_the_previous_files_byte_identical(tmp_path, capsys):
    from helpers.datasets import write_imagefolder

    data = write_imagefolder(tmp_path / "data", per_class=2, size=16)
    out = tmp_path / "run"
    assert main([*IMG, "--data-path", str(data), "-j", "0", "--epochs", "1", "--output-dir", str(out)]) == 0
    before = snapshot(out)
    bad = data / "train" / "b" / "0.png"
    bad.write_bytes(b"\x89PNG damaged")
    capsys.readouterr()
    rc = main([*IMG, "--data-path", str(data), "-j", "2", "--epochs", "1", "--output-dir", str(out), "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(bad) in err and str(data / "train") in err
    assert snapshot(out) == before
