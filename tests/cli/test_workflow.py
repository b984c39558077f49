"""The CLI path a user runs: learned masks -> fine-tune with them fixed -> eval -> export -> eval the file.

Also: ``--weights`` of any semisparse file keeps its masks exactly (learned ones as their argmax), and
``--test-only --resume`` needs no other flag.
"""

import copy
import json
import re

import pytest
import torch

import semisparse as ss
from semisparse.cli import main
from semisparse.models import create_model, load_weights
from semisparse.train.checkpoint import atomic_save
from semisparse.train.data import load_data
from semisparse.train.engine import checkpoint_dict, evaluate
from semisparse.train.loaders import make_loaders
from semisparse.train.sparsity import SparsityConfig, TrainingSparsity

FAST = ["train", "--device", "cpu", "--data-path", "digits", "--lr", "0.05", "--print-freq", "0"]
TEST_LINE = re.compile(r"test: val_loss (\S+) val_acc1 (\S+) val_acc5 (\S+)")


def scores(out: str) -> tuple[str, str, str]:
    (found,) = TEST_LINE.findall(out)
    return found


def learned_mask_model(seed: int = 0):
    """A digits CNN under learned 2:4 masks whose logits are random: their argmax is not the magnitude mask."""
    torch.manual_seed(seed)
    model = create_model("digits_cnn", num_classes=10)
    sp = TrainingSparsity(SparsityConfig(method="gumbel", pattern="2:4"))
    sp.apply(model, total_steps=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logits"):
                p.normal_(0, 3)
    return model, sp


@pytest.fixture(scope="module")
def mask_checkpoint(tmp_path_factory):
    model, sp = learned_mask_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = {"model": "digits_cnn", "data_path": "digits", "sparsity": "gumbel_2x4", "pattern": "2:4"}
    path = tmp_path_factory.mktemp("mask") / "checkpoint.pth"
    atomic_save(checkpoint_dict(model, opt, None, 0, 0, args=args, sparsity=sp), str(path))
    return model, str(path)


def reference_scores(model) -> tuple[str, str, str]:
    """The masked model's own validation scores, formatted as the CLI prints them."""
    data = load_data("digits")
    _, val = make_loaders(data, 32, 0)
    ev = evaluate(copy.deepcopy(model).eval(), torch.nn.CrossEntropyLoss(), val)
    return f"{ev['loss']:.4f}", f"{ev['acc1']:.2f}", f"{ev['acc5']:.2f}"


def test_load_weights_of_a_learned_mask_checkpoint_gives_the_argmax_masked_weights(mask_checkpoint):
    model, path = mask_checkpoint
    plain = create_model("digits_cnn", num_classes=10)
    load_weights(plain, path)
    expected = ss.finalize(copy.deepcopy(model)).state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_load_weights_refuses_logits_without_masks(tmp_path):
    model, _ = learned_mask_model()
    path = tmp_path / "sd.pth"
    torch.save(model.state_dict(), path)  # a bare state_dict: learned-mask logits, no recorded masks
    with pytest.raises(ss.SemisparseError, match="learned-mask logits"):
        load_weights(create_model("digits_cnn", num_classes=10), path)


def test_test_only_weights_of_learned_masks_scores_the_masked_model(mask_checkpoint, capsys):
    model, path = mask_checkpoint
    assert main([*FAST, "--test-only", "--weights", path]) == 0
    out = capsys.readouterr().out
    assert scores(out) == reference_scores(model)
    assert "4 masks (2:4) kept fixed" in out


def test_eval_of_checkpoint_and_of_its_export_agree(mask_checkpoint, tmp_path, capsys):
    model, path = mask_checkpoint
    out_file = tmp_path / "m.safetensors"
    assert main(["export", path, "-o", str(out_file)]) == 0
    capsys.readouterr()
    assert main(["eval", path, "--data-path", "digits", "--device", "cpu"]) == 0
    a = scores(capsys.readouterr().out)
    assert main(["eval", str(out_file), "--device", "cpu"]) == 0
    b = scores(capsys.readouterr().out)
    assert main([*FAST, "--test-only", "--weights", str(out_file)]) == 0  # train accepts a compressed file too
    c = scores(capsys.readouterr().out)
    assert a == b == c == reference_scores(model)


def test_masks_of_weights_conflicting_with_learning_new_ones_is_one_line(mask_checkpoint, capsys):
    _, path = mask_checkpoint
    assert main([*FAST, "--epochs", "1", "--weights", path, "--sparsity", "gumbel_2x4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-keep-masks" in err and "--resume" in err
    assert main([*FAST, "--epochs", "1", "--weights", path, "--dst", "rigl"]) == 2
    assert "--no-keep-masks" in capsys.readouterr().err


def test_keep_masks_needs_a_masked_weights_file(tmp_path, capsys):
    plain = tmp_path / "plain.pth"
    torch.save(create_model("digits_cnn", num_classes=10).state_dict(), plain)
    assert main([*FAST, "--epochs", "1", "--weights", str(plain), "--keep-masks"]) == 2
    assert "carries no masks" in capsys.readouterr().err


def test_share_of_sparse_parameters_is_one_definition(mask_checkpoint, tmp_path):
    """Training (learned-mask logits are parameters), the loaded file and the deployed model agree."""
    model, path = mask_checkpoint
    x = torch.randn(1, 1, 8, 8)
    training = ss.report(model, x).param_share
    loaded = ss.load(_export(path, tmp_path)).eval()
    from_file = ss.report(loaded, x).param_share
    deployed = ss.report(ss.deploy(copy.deepcopy(loaded), example_input=x), x).param_share
    weights = {k: v.numel() for k, v in create_model("digits_cnn", num_classes=10).state_dict().items()
               if k.endswith("weight") and v.dim() > 1}
    sparse = sum(n for k, n in weights.items() if k != "features.0.weight")  # first conv: 1 channel, dense
    assert training == from_file == deployed == pytest.approx(sparse / sum(weights.values()))


def _export(path: str, tmp_path) -> str:
    out = tmp_path / "share.safetensors"
    assert main(["export", path, "-o", str(out)]) == 0
    return str(out)


def test_test_only_resume_needs_no_other_flag(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*FAST, "-b", "256", "--epochs", "1", "--opt", "adamw", "--lr", "0.01", "--sparsity", "sparse_2x4",
                 "--apex-verbosity", "0", "--output-dir", str(run)]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    assert main(["train", "--device", "cpu", "--test-only", "--resume", str(run / "checkpoint.pth")]) == 0
    val_loss, acc1, _ = scores(capsys.readouterr().out)
    assert (val_loss, acc1) == (f"{last['val_loss']:.4f}", f"{last['val_acc1']:.2f}")


@pytest.mark.slow
def test_learned_masks_fine_tune_eval_export_end_to_end(tmp_path, capsys):
    """The README's command-line path on the digits: each step keeps the learned masks exactly."""
    dense, mask, tuned = tmp_path / "dense", tmp_path / "mask", tmp_path / "tuned"
    assert main([*FAST, "-b", "64", "--epochs", "2", "--output-dir", str(dense)]) == 0
    assert main([*FAST, "-b", "256", "--epochs", "1", "--weights", str(dense / "checkpoint.pth"),
                 "--sparsity", "gumbel_2x4", "--output-dir", str(mask)]) == 0
    learned = torch.load(mask / "checkpoint.pth", weights_only=True)["sparsity"]["masks"]
    assert main([*FAST, "-b", "256", "--epochs", "1", "--weights", str(mask / "checkpoint.pth"),
                 "--output-dir", str(tuned)]) == 0
    ckpt = torch.load(tuned / "checkpoint.pth", weights_only=True)
    assert ckpt["sparsity"]["method"] == "given" and ckpt["sparsity"]["pattern"] == "2:4"
    assert learned.keys() == ckpt["sparsity"]["masks"].keys()
    assert all(torch.equal(learned[k], ckpt["sparsity"]["masks"][k]) for k in learned)
    last = json.loads((tuned / "metrics.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    assert main(["eval", str(tuned / "checkpoint.pth")]) == 0
    from_ckpt = scores(capsys.readouterr().out)
    assert from_ckpt[:2] == (f"{last['val_loss']:.4f}", f"{last['val_acc1']:.2f}")
    assert float(from_ckpt[1]) > 50  # the dense start was learned; the masks kept most of it
    out_file = tmp_path / "model.safetensors"
    assert main(["export", str(tuned / "checkpoint.pth"), "-o", str(out_file)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out_file)]) == 0
    assert scores(capsys.readouterr().out) == from_ckpt
