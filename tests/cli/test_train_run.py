"""`semisparse train` flags whose effect is the whole run: test-only, config recipes, logging, W&B."""

import glob
import json
import os
import sys
import types

import pytest

import semisparse
from semisparse.cli import main

FAST = ["train", "--device", "cpu", "--data-path", "digits", "-b", "128", "--lr", "0.05"]


def test_output_dir_gets_metrics_with_the_documented_fields(tmp_path):
    assert main([*FAST, "--epochs", "1", "--model-ema", "--sparsity", "sparse_2x4", "--output-dir", str(tmp_path)]) == 0
    (row,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"epoch", "lr", "train_loss", "val_loss", "val_acc1", "val_acc5", "sparsity", "epoch_seconds",
            "ema_val_acc1"} <= set(row)
    assert row["epoch"] == 0 and row["sparsity"] == pytest.approx(0.5)
    files = {p.name for p in tmp_path.iterdir()} - {"tensorboard"}  # present when tensorboard is installed
    assert files == {"checkpoint.pth", "metrics.jsonl", "model_0.pth"}


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory):
    import torch

    from semisparse.models import create_model

    path = tmp_path_factory.mktemp("w") / "digits_cnn.pth"
    torch.manual_seed(0)
    torch.save(create_model("digits_cnn", num_classes=10).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("flag", [["--test-only"], ["--trainable", "none"]])
def test_test_only_evaluates_and_writes_nothing(flag, tmp_path, capsys, digits_weights):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert main([*FAST, "--epochs", "1", "--output-dir", str(out_dir), "--weights", digits_weights, *flag]) == 0
    out = capsys.readouterr().out
    assert "test: val_loss" in out and "epoch 0" not in out
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("flag", [["--test-only"], ["--trainable", "none"]])
def test_test_only_without_weights_or_resume_is_refused(flag, capsys):
    # a fresh model is random: scoring it silently invites mistaking a random model's accuracy for a result
    assert main([*FAST, "--epochs", "1", *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag[0] in err and "--weights" in err and "--resume" in err, err


def test_test_only_with_resume_evaluates_the_checkpoint(tmp_path, capsys):
    assert main([*FAST, "--epochs", "2", "--output-dir", str(tmp_path)]) == 0
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    assert main([*FAST, "--epochs", "2", "--test-only", "--resume", str(tmp_path / "checkpoint.pth")]) == 0
    assert f"val_acc1 {last['val_acc1']:.2f}" in capsys.readouterr().out


def test_print_freq_sets_progress_lines(capsys):
    assert main([*FAST, "--epochs", "1", "--print-freq", "0"]) == 0
    quiet = capsys.readouterr().out
    assert main([*FAST, "--epochs", "1", "--print-freq", "4"]) == 0
    chatty = capsys.readouterr().out
    assert "[1/12]" not in quiet and "[1/12]" in chatty and "[5/12]" in chatty and "[12/12]" in chatty


def test_apex_verbosity_sets_the_sparsity_report(capsys):
    main([*FAST, "--epochs", "1", "--sparsity", "sparse_2x4", "--apex-verbosity", "1"])
    one = capsys.readouterr().out
    main([*FAST, "--epochs", "1", "--sparsity", "sparse_2x4", "--apex-verbosity", "3"])
    three = capsys.readouterr().out
    main([*FAST, "--epochs", "1", "--sparsity", "sparse_2x4", "--apex-verbosity", "0"])
    zero = capsys.readouterr().out
    assert "layers masked" in one and "features.2.weight" not in one
    assert "features.2.weight" in three and "sparsity settings" in three
    assert "layers masked" not in zero


def test_config_recipe_sets_flags_and_the_command_line_wins(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.01\nlr-scheduler: cosineannealinglr\nsparsity: sparse_2x4\nmodel_ema: true\n"
                      "mask_tau: [2, 1]\nepochs: 3\n")
    from semisparse.cli.train import parse_args

    args = parse_args(["--config", str(recipe), "--lr", "0.2"])
    assert args.lr == 0.2 and args.lr_scheduler == "cosineannealinglr" and args.sparsity == "sparse_2x4"
    assert args.model_ema is True and args.mask_tau == [2.0, 1.0] and args.epochs == 3
    assert {"lr", "lr_scheduler", "sparsity", "model_ema", "mask_tau", "epochs"} <= args.explicit
    recipe.write_text("learning_rate: 0.1\n")
    with pytest.raises(Exception, match="unknown option 'learning_rate'"):
        parse_args(["--config", str(recipe)])
    recipe.write_text("sparsity: dense\n")
    with pytest.raises(semisparse.SemisparseError, match=r"--config .*r.yaml: argument --sparsity: invalid choice"):
        parse_args(["--config", str(recipe)])  # choices are checked as for typed flags, in one line


@pytest.mark.parametrize("text, message", [
    ("lr: [0.1, 0.2]\n", "lr takes one value, got [0.1, 0.2]"),
    ("mask_tau: [2, 1, 0.5]\n", "mask_tau takes 2 values, got [2, 1, 0.5]"),
    ("dense_layers: []\n", "dense_layers takes one or more values"),
    ("lr: {a: 1}\n", "lr takes one value"),
    ('epochs: "x"\n', "argument --epochs: invalid int value: 'x'"),
    ("mask_tau: 2\n", "argument --mask-tau: expected 2 arguments"),
])
def test_config_values_of_the_wrong_kind_are_one_line_naming_the_recipe(text, message, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    capsys.readouterr()
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--config {recipe}: " in err and message in err, err


def test_use_wandb_without_wandb_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main([*FAST, "--epochs", "1", "--use-wandb"]) == 2
    err = capsys.readouterr().err
    assert "pip install wandb" in err and "metrics.jsonl" in err


def test_use_wandb_logs_every_epoch(monkeypatch, tmp_path):
    logged, init = [], {}

    def fake_init(**kw):
        init.update(kw)
        return types.SimpleNamespace(log=lambda d, step: logged.append((step, d)))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=fake_init))
    assert main([*FAST, "--epochs", "2", "--use-wandb", "--wandb-project", "p", "--wandb-log-dir", str(tmp_path)]) == 0
    assert init["project"] == "p" and init["dir"] == str(tmp_path) and init["config"]["lr"] == 0.05
    assert [s for s, _ in logged] == [0, 1] and "val_acc1" in logged[0][1]


def test_tensorboard_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    assert main([*FAST, "--epochs", "1", "--output-dir", str(tmp_path)]) == 0
    assert list((tmp_path / "tensorboard").iterdir())


def test_sparse_2x4_prunes_the_given_weights_once_asp(tmp_path):
    import torch

    import semisparse as ss
    from semisparse.cli.train import parse_args, setup, validate
    from semisparse.models import create_model

    assert main([*FAST, "--epochs", "1", "--output-dir", str(tmp_path)]) == 0
    weights = str(tmp_path / "checkpoint.pth")
    run = setup(validate(parse_args(["--device", "cpu", "--weights", weights, "--sparsity", "sparse_2x4",
                                     "--apex-verbosity", "0"])))
    ref = create_model("digits_cnn", num_classes=10, weights=weights)
    ss.sparsify(ref, "2:4")
    got, want = ss.masks(run.model), ss.masks(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    orig = lambda m: m.features[2].parametrizations.weight.original  # noqa: E731
    torch.testing.assert_close(orig(run.model), orig(ref))


RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(semisparse.__file__), "recipes", "*.yaml")))


@pytest.mark.parametrize("recipe", [os.path.basename(r) for r in RECIPES])
def test_bundled_recipes_are_valid_and_found_by_name(recipe):
    from semisparse.cli.train import parse_args, validate

    by_name = validate(parse_args(["--config", recipe[: -len(".yaml")]]))
    by_path = validate(parse_args(["--config", os.path.join(os.path.dirname(RECIPES[0]), recipe)]))
    strip = lambda a: {k: v for k, v in vars(a).items() if k != "config"}  # noqa: E731
    assert strip(by_name) == strip(by_path) and by_name.explicit


def test_weights_enum_member_alone_is_looked_up_in_the_models_enum(tmp_path, monkeypatch):
    import torch
    import torchvision

    from semisparse.models import create_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1.url
    path = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    for name in ("IMAGENET1K_V1", "DEFAULT", "SqueezeNet1_1_Weights.IMAGENET1K_V1"):
        create_model("squeezenet1_1", weights=name)


def test_skip_bad_images_trains_on_the_readable_ones_and_counts_the_rest_at_the_end(tmp_path, capsys):
    from helpers.datasets import write_imagefolder

    data = write_imagefolder(tmp_path / "data", per_class=2, size=16)
    (data / "train" / "a" / "1.png").write_bytes(b"damaged")
    argv = ["train", "--device", "cpu", "--model", "digits_cnn", "-b", "2", "--print-freq", "0", "-j", "0",
            "--train-crop-size", "16", "--val-resize-size", "16", "--val-crop-size", "16", "--data-path", str(data),
            "--epochs", "2"]
    capsys.readouterr()
    assert main([*argv, "--skip-bad-images"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "--skip-bad-images: skipped 1 unreadable image file (named above)"
    assert sum(str(data / "train" / "a" / "1.png") in line for line in err) == 1  # named once in two epochs
    assert main(argv) == 2  # without the flag: the one-line error
