"""`semisparse prune` end to end on the bundled digits: one-shot, the files it writes, and what reads them."""

from __future__ import annotations

import re

import pytest
import torch

import semisparse as ss
from semisparse import models
from semisparse.cli import main as cli

COMMON = ["--device", "cpu", "--data-path", "digits", "-b", "64", "--quiet"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = models.create_model("digits_cnn", num_classes=10)
    path = tmp_path_factory.mktemp("w") / "dense.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _acc(text: str, label: str) -> float:
    return float(re.search(rf"^{label}.*val_acc1 ([0-9.]+)", text, re.M).group(1))


@pytest.mark.parametrize("method, pattern", [("sparsegpt", ["--pattern", "2:4"]),
                                             ("wanda", ["--sparsity-level", "0.75"])])
def test_prune_writes_a_compressed_file_and_a_checkpoint_train_reads(weights, tmp_path, capsys, method, pattern):
    out = tmp_path / "m.safetensors"
    run = tmp_path / "run"
    argv = ["prune", *COMMON, "--weights", str(weights), "--method", method, *pattern, "--calib-batches", "2",
            "--recalibrate-bn", "-o", str(out), "--output-dir", str(run)]
    assert cli(argv) == 0
    text = capsys.readouterr().out
    before, after = _acc(text, "before"), _acc(text, "after")
    assert 0 <= before <= 100 and 0 <= after <= 100
    assert method in text and "rel_err" in text
    model = ss.load(out)
    ss.check(model)
    masks = ss.masks(model)
    assert len(masks) == (4 if method == "sparsegpt" else 5)  # 2:4: every layer but the 1-channel stem
    if method == "sparsegpt":
        m = masks["classifier.1.weight"]
        assert bool((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all())
    else:
        m = masks["classifier.1.weight"]
        assert bool((m.sum(1) == 64).all())  # 25% of 256 inputs kept in every row
    # the checkpoint is what `train --weights` fine-tunes from: its masked weights give the same top-1
    ckpt = run / "checkpoint.pth"
    assert cli(["train", "--device", "cpu", "--data-path", "digits", "-b", "64", "--print-freq", "0",
                "--weights", str(ckpt), "--test-only"]) == 0
    test_line = capsys.readouterr().out
    assert float(re.search(r"val_acc1 ([0-9.]+)", test_line).group(1)) == pytest.approx(after, abs=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pattern", "2:4", "--sparsity-level", "0.5"], "give --pattern (N:M) or --sparsity-level"),
        (["--calib-batches", "0"], "--calib-batches must be at least 1"),
        (["--method", "wanda", "--dampening", "0.1"], "--dampening applies to --method sparsegpt only"),
        (["-o", "model.pth"], "writes a compressed .safetensors file"),
        (["--method", "magnitude", "--shared-rows", "0"], "--shared-rows must be at least 1"),
    ],
)
def test_prune_bad_flags_are_one_line(weights, capsys, extra, message):
    assert cli(["prune", *COMMON, "--weights", str(weights), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt", "wanda"])
def test_prune_with_shared_rows_keeps_2_4_shared_by_blocks_of_4(weights, tmp_path, capsys, method):
    out = tmp_path / "m.safetensors"
    assert cli(["prune", *COMMON, "--weights", str(weights), "--method", method, "--pattern", "2:4",
                "--calib-batches", "2", "--shared-rows", "4", "-o", str(out)]) == 0
    assert method in capsys.readouterr().out
    model = ss.load(out)
    ss.check(model)
    for key, m in ss.masks(model).items():
        rows = m.flatten(1)
        for start in range(0, rows.shape[0], 4):
            assert bool((rows[start:start + 4] == rows[start]).all()), key
