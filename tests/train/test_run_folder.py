"""One run per ``--output-dir``: a lock taken before the first write, held until the run exits (a killed
run's lock does not block); a read-only folder is refused at start-up."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import paths
from semisparse.cli import main
from semisparse.errors import SemisparseError
from semisparse.train import run_folder

FAST = ["train", "--device", "cpu", "--data-path", "digits", "-b", "128", "--lr", "0.05", "--print-freq", "0"]
SRC = str(paths.SRC)
FORK = multiprocessing.get_context("fork")  # starts at once (torch is imported already): truly concurrent claims


def _hold(folder, ready):
    run_folder.claim_output_dir(folder)
    ready.set()
    time.sleep(120)


def _claim_together(folder, barrier, results):
    barrier.wait()
    try:
        f = run_folder.claim_output_dir(folder)
    except SemisparseError as exc:
        results.put((os.getpid(), str(exc)))
        return
    results.put((os.getpid(), "claimed"))
    time.sleep(1.0)  # still running when the other one claims
    f.release()


def test_two_processes_claiming_one_folder_at_the_same_moment_one_is_refused_naming_the_other(tmp_path):
    out = str(tmp_path / "run")
    for _ in range(3):
        barrier, results = FORK.Barrier(2), FORK.Queue()
        procs = [FORK.Process(target=_claim_together, args=(out, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        got = dict(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        winners = [pid for pid, r in got.items() if r == "claimed"]
        assert len(winners) == 1, got
        loser = next(r for r in got.values() if r != "claimed")
        assert f"in use by another run (pid {winners[0]}," in loser and len(loser.splitlines()) == 1, loser
    # each winner released it: no lock file left, nothing written (the folder itself stays when the process
    # that created it lost the race: only a winner that created it removes it)
    assert not os.path.exists(out) or os.listdir(out) == []


def test_a_live_runs_folder_is_refused_at_start_up_and_a_killed_runs_lock_does_not_block(tmp_path, capsys):
    out = tmp_path / "run"
    ready = FORK.Event()
    holder = FORK.Process(target=_hold, args=(str(out), ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(SemisparseError, match=rf"in use by another run \(pid {holder.pid}\b") as info:
            run_folder.claim_output_dir(str(out))
        assert len(str(info.value).splitlines()) == 1
        t0 = time.perf_counter()
        capsys.readouterr()
        assert main([*FAST, "--epochs", "1", "--output-dir", str(out)]) == 2  # a run that has written nothing yet
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {holder.pid}" in err, err
        assert time.perf_counter() - t0 < 10  # refused before data, model or an epoch
        assert os.listdir(out) == [run_folder.LOCK_NAME]  # the refused runs changed nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    assert os.path.exists(out / run_folder.LOCK_NAME)  # a killed run's lock file stays, unlocked
    folder = run_folder.claim_output_dir(str(out))  # and does not block
    with pytest.raises(SemisparseError, match=rf"pid {os.getpid()}\b"):  # held now, even against this process
        run_folder.claim_output_dir(str(out))
    folder.release()
    assert os.listdir(out) == []  # released: the lock file is gone (the folder was not created by this claim)


def test_a_claimed_folder_that_existed_is_kept_and_a_run_leaves_no_lock_file(tmp_path):
    out = tmp_path / "run"
    assert main([*FAST, "--epochs", "1", "--output-dir", str(out)]) == 0
    assert run_folder.LOCK_NAME not in os.listdir(out)
    folder = run_folder.claim_output_dir(str(out), resume=str(out / "checkpoint.pth"))
    folder.release()
    assert {"checkpoint.pth", "metrics.jsonl", "model_0.pth"} <= set(os.listdir(out))


@pytest.mark.slow  # two fresh interpreters training side by side
def test_two_cli_runs_started_together_into_one_folder_one_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [sys.executable, "-m", "semisparse", *FAST, "--epochs", "2", "--output-dir", str(out)]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], results
    err = next(e for rc, _, e in results if rc == 2).strip()
    winner = next(p for p, (rc, _, _) in zip(procs, results) if rc == 0)
    # refused while the other one ran (naming it), or after it finished (its files are there)
    assert len(err.splitlines()) == 1, err
    assert f"in use by another run (pid {winner.pid}" in err or "holds another run's files" in err, err
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_refused_at_start_up(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        t0 = time.perf_counter()
        assert main([*FAST, "--epochs", "1", "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not writable" in err and str(out) in err, err
        assert time.perf_counter() - t0 < 5  # before data, model or an epoch
    finally:
        out.chmod(0o755)


def test_an_output_dir_this_process_cannot_write_is_refused_at_start_up(tmp_path, monkeypatch, capsys):
    run_folder.check_writable(str(tmp_path))  # writable: fine
    run_folder.check_writable(str(tmp_path / "missing"))  # created later: fine
    assert os.listdir(tmp_path) == []  # the probe is removed

    def read_only(*a, **kw):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(run_folder.tempfile, "mkstemp", read_only)
    with pytest.raises(SemisparseError, match=r"is not writable \(Read-only file system\)"):
        run_folder.check_writable(str(tmp_path))
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main([*FAST, "--epochs", "1", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not writable (Read-only file system)" in err, err
    assert time.perf_counter() - t0 < 5  # before data, model or an epoch


def _sleep(ready):
    ready.set()
    time.sleep(60)


def test_a_forked_child_such_as_a_dataloader_worker_does_not_keep_the_folder_locked(tmp_path):
    out = str(tmp_path / "run")
    folder = run_folder.claim_output_dir(out)
    ready = FORK.Event()
    child = FORK.Process(target=_sleep, args=(ready,))  # forked while the lock is held
    child.start()
    try:
        assert ready.wait(60)
        os.close(folder.lock.fd)  # the run dies (its descriptor closed) while its worker lingers
        folder.lock.fd = None
        run_folder.claim_output_dir(out).release()  # not blocked by the child
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
