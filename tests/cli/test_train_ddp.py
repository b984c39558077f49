"""`torchrun --nproc-per-node 2 -m semisparse train` (gloo on CPU) equals one process with the same global batch."""

import json
import os
import subprocess
import sys

import torch

from semisparse.cli import main


def _metrics(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_equal_one_process(tmp_path):
    common = ["--device", "cpu", "--data-path", "digits", "--model", "digits_cnn", "--epochs", "1", "--lr", "0.05",
              "--sparsity", "sparse_2x4", "--print-freq", "0", "--apex-verbosity", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "-m", "semisparse", "train", *common, "-b", "16", "--output-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", *common, "-b", "32", "--output-dir", str(tmp_path / "one")]) == 0

    ddp, one = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "one")
    assert len(ddp) == 1  # rank 0 alone writes
    for key in ("train_loss", "val_loss", "val_acc1", "val_acc5"):
        assert abs(ddp[0][key] - one[0][key]) < 1e-3 * max(1.0, abs(one[0][key])), key
    a = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(a[k], b[k]), k
    assert not list((tmp_path / "ddp").glob(".*tmp*"))
