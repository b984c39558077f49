"""``benchmarks/gpu_train_step.py --smoke``: the GPU session's script runs end to end on CPU (tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import paths

ROOT = paths.ROOT


@pytest.mark.slow
def test_gpu_train_step_script_smoke_run_writes_every_part(tmp_path):
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_train_step.py"), "--smoke", "--json", str(out), "--models",
           "tiny_cnn"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["skipped"] == []
    parts = result["parts"]
    assert all(row["ok"] for row in parts["check"].values())
    assert set(parts["eager"]["tiny_cnn"]) == {"dense", "magnitude", "srigl90", "learned_torch", "learned_triton",
                                               "learned_compiled"}  # fmt: skip
    assert set(parts["compiled"]["tiny_cnn"]) == {"dense", "magnitude", "srigl90", "learned"}
    assert parts["srigl_update"]["tiny_cnn"]["update_ms"] > 0
    assert result["ratios"]["eager"]["tiny_cnn"]["dense"] == 1.0
