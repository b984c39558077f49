"""Learned masks started from a calibrated one-shot mask in training (`--mask-prior-from`)."""



import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse.cli import main as cli
from semisparse.train.sparsity import SparsityConfig, TrainingSparsity


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))


def test_training_sparsity_prior_from_sparsegpt_starts_at_the_one_shot_masks():
    x = torch.randn(32, 4, 4, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(32, dtype=torch.long)),
                                         batch_size=8)
    oneshot, learned = _net(), _net()
    ss.sparsify(oneshot, "2:4", method="sparsegpt", calibration=loader, calib_batches=16)
    sp = TrainingSparsity(SparsityConfig(method="gumbel", pattern="2:4", prior_from="sparsegpt"))
    sp.apply(learned, total_steps=10, calibration=loader)
    want, got = ss.masks(oneshot), ss.masks(learned)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_mask_prior_from_needs_learned_masks(capsys):
    rc = cli(["train", "--device", "cpu", "--data-path", "digits", "--epochs", "1", "--mask-prior-from", "sparsegpt"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "--mask-prior-from needs --sparsity gumbel_2x4" in err and "\n" not in err


@pytest.mark.slow
def test_train_cli_runs_learned_masks_from_sparsegpt(capsys, tmp_path):
    assert cli(["train", "--device", "cpu", "--data-path", "digits", "-b", "256", "--epochs", "1", "--print-freq",
                "0", "--sparsity", "gumbel_2x4", "--trainable", "gumbel_2x4", "--mask-prior-from", "sparsegpt",
                "--opt", "adamw", "--lr", "0.01"]) == 0
    assert "val_acc1" in capsys.readouterr().out

