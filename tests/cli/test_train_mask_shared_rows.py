"""Learned masks shared by blocks of output rows in training (`--mask-shared-rows`)."""

import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse.cli import main as cli
from semisparse.layout import Layout
from semisparse.masking.gumbel import learned_masks
from semisparse.train.checkpoint import load_checkpoint
from semisparse.train.sparsity import SparsityConfig, TrainingSparsity


def _shared(mask: torch.Tensor, s: int = 4) -> bool:
    view = Layout("conv" if mask.dim() == 4 else "rows", tuple(mask.shape)).to_view(mask)
    return all(bool((view[b : b + s] == view[b]).all()) for b in range(0, view.shape[0], s))


def test_training_sparsity_passes_shared_rows_and_records_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 12))
    sp = TrainingSparsity(SparsityConfig(method="gumbel", pattern="2:4", shared_rows=4))
    sp.apply(net, total_steps=10)
    assert [tuple(m.logits.shape) for m in learned_masks(net)] == [(6, 2, 9), (6, 3, 32)]
    assert all(_shared(m) for m in ss.masks(net).values())
    assert sp.state_dict()["config"]["shared_rows"] == 4


def test_shared_rows_needs_learned_masks():
    with pytest.raises(ss.SemisparseError, match="needs --sparsity gumbel_2x4"):
        SparsityConfig(method="magnitude", shared_rows=4)


def test_train_cli_learns_shared_masks_and_resumes_them(capsys, tmp_path):
    base = ["train", "--device", "cpu", "--data-path", "digits", "-b", "256", "--print-freq", "0", "--opt", "adamw",
            "--lr", "0.01", "--output-dir", str(tmp_path)]  # fmt: skip
    assert cli([*base, "--epochs", "1", "--sparsity", "gumbel_2x4", "--mask-shared-rows", "4"]) == 0
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert ckpt["args"]["mask_shared_rows"] == 4
    assert all(_shared(m) for m in ckpt["sparsity"]["masks"].values())
    # the resumed run rebuilds the shared logits from the checkpoint's flags: no flag repeated
    assert cli([*base, "--epochs", "2", "--resume", str(tmp_path / "checkpoint.pth")]) == 0
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert ckpt["epoch"] == 1 and all(_shared(m) for m in ckpt["sparsity"]["masks"].values())
    assert "val_acc1" in capsys.readouterr().out
