"""The CPU benchmark scripts a session on another processor runs (an Intel machine with AVX-512 / AMX for issue
24): each runs end to end in its ``--smoke`` size (slow: a minute or two each, out of the default run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import paths

ROOT = paths.ROOT


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_cpu_anchors_smoke_in_fp32_and_bf16(tmp_path):
    out = tmp_path / "a.json"
    proc = _run("cpu_anchors.py", "--smoke", "--bf16", "--patterns", "fan-in", "--json", str(out))
    (row,) = json.loads(out.read_text())["results"]
    assert row["deployed_bf16_ms"] > 0 and row["fastest_bf16_dense"] in row["dense_runtimes_ms"]
    assert "| ss.deploy bf16 ms |" in proc.stdout and "bf16, each alone" in proc.stdout


@pytest.mark.slow
def test_plan_time_smoke_compares_the_two_planners(tmp_path):
    out = tmp_path / "p.json"
    _run("plan_time.py", "--smoke", "--json", str(out))
    data = json.loads(out.read_text())
    assert [r["setting"] for r in data["runs"]] == ["{'prune': None}", "{'prune': 1.25}"]
    assert all(r["plan_s"] > 0 and r["condensed"] <= r["layers"] for r in data["runs"])
    assert len(data["interleaved_ms"]) == len(data["alone_ms"]) == 2


@pytest.mark.slow
def test_cpu_all_smoke_runs_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "cpu_all.sh"), "--smoke"], env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (tmp_path / "cpu_all.log").read_text()
    exits = [line for line in log.splitlines() if ": exit " in line]
    assert len(exits) == 3 and all(": exit 0 " in line for line in exits), log
    assert (tmp_path / "anchors_b1.json").exists() and (tmp_path / "layer.json").exists()
