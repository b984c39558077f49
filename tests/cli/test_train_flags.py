"""Every flag `semisparse train` accepts changes the run, or is refused with a message naming what to use.

Three kinds of check: a flag changes what ``setup`` builds (SETUP); a flag changes what ``fit`` is called
with (FIT, fit recorded instead of run); a flag is refused with a one-line message (REFUSED). Flags whose
effect is a whole run (resume, output-dir, test-only, config, print-freq...) are in the other test files.
``test_every_flag_is_covered`` keeps the table complete when a flag is added.
"""

import glob
import importlib.util
import math
import os

import pytest
import torch
from torch import nn

import semisparse as ss
from helpers.datasets import write_imagefolder
from semisparse.cli import train as cli_train
from semisparse.dst import api as dst_api
from semisparse.models import MODELS, create_model


@pytest.fixture(scope="module")
def img(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("img"), classes=("a", "b"), per_class=2, size=16)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w.pth"
    torch.manual_seed(123)
    torch.save(create_model("digits_cnn", num_classes=10).state_dict(), path)
    return str(path)


class TinyViT(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.class_token = nn.Parameter(torch.zeros(1, 8))
        self.proj = nn.Linear(3 * 16 * 16, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.proj(x.flatten(1)) + self.class_token)


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(MODELS, "tiny_vit_test", lambda num_classes=10: TinyViT(num_classes))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: nn.Sequential(m))  # a marker wrapper, no inductor
    yield
    torch.use_deterministic_algorithms(False)


IMG_BASE = ["--train-crop-size", "16", "--val-resize-size", "16", "--val-crop-size", "16"]
IMG_MODEL = ["--model", "digits_cnn"]  # in_channels=3 on image data: small and quick


def build(argv, data, img):
    path = "digits" if data == "D" else str(img)
    extra = [] if data == "D" else [*IMG_BASE, *IMG_MODEL]
    args = cli_train.validate(cli_train.parse_args(["--device", "cpu", "--epochs", "2", "-j", "0",
                                                    "--data-path", path, *extra, *argv]))
    return cli_train.setup(args)


def wd(r):
    return sorted(g["weight_decay"] for g in r.optimizer.param_groups)


def masks(r):
    return {k: round(float(v.float().mean()), 4) for k, v in ss.masks(r.model).items()}


def tt(r):
    return repr(r.data.train_transform)


def vt(r):
    return repr(r.data.val_transform)


def gumbel(r):
    from semisparse.masking.gumbel import learned_masks

    return learned_masks(r.model)


def dst_kw(r):
    """The DST settings the flags gave and what the scheduler built from them made of them."""
    d = r.sparsity.dst
    return r.sparsity.config.dst, d.rule, d.schedule, d.sparsity, [s["key"] for s in d.layer_stats()]


def p0(r):
    return float(next(r.model.parameters()).detach().sum())


G = ["--sparsity", "gumbel_2x4"]
S = ["--sparsity", "sparse_2x4"]
# flag: (data, base argv, argv adding the flag, probe of the built run)
SETUP = {
    "--data-path": ("D", [], ["--data-path", "IMG", "--model", "resnet18", *IMG_BASE], lambda r: r.data.kind),
    "--model": ("I", [], ["--model", "resnet18_cifar"], lambda r: r.model.semisparse_arch["name"]),
    "-b": ("D", [], ["-b", "8"], lambda r: r.train_loader.batch_size),
    "-j": ("D", [], ["-j", "1"], lambda r: r.train_loader.num_workers),
    "--opt": ("D", [], ["--opt", "adamw"], lambda r: type(r.optimizer).__name__),
    "--lr": ("D", [], ["--lr", "0.01"], lambda r: r.optimizer.param_groups[0]["lr"]),
    "--momentum": ("D", [], ["--momentum", "0.5"], lambda r: r.optimizer.param_groups[0]["momentum"]),
    "--wd": ("D", [], ["--wd", "0.1"], wd),
    "--norm-weight-decay": ("I", ["--model", "resnet18"], ["--norm-weight-decay", "0"], wd),
    "--bias-weight-decay": ("D", [], ["--bias-weight-decay", "0"], wd),
    "--transformer-embedding-decay": ("I", ["--model", "tiny_vit_test"], ["--transformer-embedding-decay", "0"], wd),
    "--label-smoothing": ("D", [], ["--label-smoothing", "0.1"], lambda r: r.criterion.label_smoothing),
    "--mixup-alpha": ("D", [], ["--mixup-alpha", "0.2"], lambda r: r.batch_transform is None),
    "--cutmix-alpha": ("D", [], ["--cutmix-alpha", "0.2"], lambda r: r.batch_transform is None),
    "--lr-scheduler": ("D", [], ["--lr-scheduler", "exponentiallr"], lambda r: type(r.lr_scheduler).__name__),
    "--lr-warmup-epochs": ("D", [], ["--lr-warmup-epochs", "1"], lambda r: type(r.lr_scheduler).__name__),
    "--lr-warmup-method": ("D", ["--lr-warmup-epochs", "1"], ["--lr-warmup-method", "linear"],
                           lambda r: type(r.lr_scheduler._schedulers[0]).__name__),
    "--lr-warmup-decay": ("D", ["--lr-warmup-epochs", "1"], ["--lr-warmup-decay", "0.5"],
                          lambda r: r.optimizer.param_groups[0]["lr"]),
    "--lr-step-size": ("D", [], ["--lr-step-size", "3"], lambda r: r.lr_scheduler.step_size),
    "--lr-gamma": ("D", [], ["--lr-gamma", "0.5"], lambda r: r.lr_scheduler.gamma),
    "--lr-min": ("D", ["--lr-scheduler", "cosineannealinglr"], ["--lr-min", "0.01"], lambda r: r.lr_scheduler.eta_min),
    "--start-epoch": ("D", [], ["--start-epoch", "1"], lambda r: r.start_epoch),
    "--cache-dataset": ("I", [], ["--cache-dataset"],
                        lambda r: len(glob.glob(os.path.join(os.environ["XDG_CACHE_HOME"], "semisparse/*/*.json")))),
    "--auto-augment": ("I", [], ["--auto-augment", "ta_wide"], tt),
    "--ra-magnitude": ("I", ["--auto-augment", "ra"], ["--ra-magnitude", "5"], tt),
    "--augmix-severity": ("I", ["--auto-augment", "augmix"], ["--augmix-severity", "1"], tt),
    "--random-erase": ("I", [], ["--random-erase", "0.5"], tt),
    "--amp": ("D", [], ["--amp"], lambda r: r.amp_dtype),
    "--amp-dtype": ("D", ["--amp"], ["--amp-dtype", "float16"], lambda r: r.amp_dtype),
    "--model-ema": ("D", [], ["--model-ema"], lambda r: r.ema is None),
    "--model-ema-steps": ("D", ["--model-ema"], ["--model-ema-steps", "4"], lambda r: r.ema.decay),
    "--model-ema-decay": ("D", ["--model-ema"], ["--model-ema-decay", "0.9"], lambda r: r.ema.decay),
    "--use-deterministic-algorithms": ("D", [], ["--use-deterministic-algorithms"],
                                       lambda r: torch.are_deterministic_algorithms_enabled()),
    "--interpolation": ("I", [], ["--interpolation", "bicubic"], tt),
    "--val-resize-size": ("I", [], ["--val-resize-size", "20"], vt),
    "--val-crop-size": ("I", [], ["--val-crop-size", "12"], vt),
    "--train-crop-size": ("I", [], ["--train-crop-size", "12"], tt),
    "--ra-sampler": ("D", [], ["--ra-sampler"], lambda r: r.train_loader.sampler.repeats),
    "--ra-reps": ("D", ["--ra-sampler"], ["--ra-reps", "2"], lambda r: r.train_loader.sampler.repeats),
    "--weights": ("D", [], ["--weights", "WEIGHTS"], p0),
    "--backend": ("I", [], ["--backend", "tensor"], tt),
    "--use-v2": ("I", [], ["--use-v2"], tt),
    "--seed": ("D", [], ["--seed", "1"], p0),
    "--sparsity": ("D", [], S, masks),
    "--pattern": ("D", S, ["--pattern", "1:4"], masks),
    "--trainable": ("D", G, ["--trainable", "gumbel_2x4"],
                    lambda r: r.model.features[2].parametrizations.weight.original.requires_grad),
    "--mask-tau": ("D", G, ["--mask-tau", "3", "0.5"], lambda r: gumbel(r)[0].tau),
    "--mask-prior": ("D", G, ["--mask-prior", "0"], lambda r: float(gumbel(r)[0].logits.detach().std())),
    "--mask-shared-rows": ("D", G, ["--mask-shared-rows", "4"], lambda r: [tuple(m.logits.shape) for m in gumbel(r)]),
    "--mask-prior-from": ("D", G, ["--mask-prior-from", "sparsegpt"],
                          lambda r: [m.hard_mask().flatten().tolist() for m in gumbel(r)]),
    "--aug-for-2x4": ("D", S, ["--aug-for-2x4"], masks),
    "--ignore-linear": ("D", S, ["--ignore-linear"], masks),
    "--ignore-grouped": ("I", [*S, "--model", "regnet_x_400mf"], ["--ignore-grouped"], lambda r: len(masks(r))),
    "--apex-permutation": ("D", S, ["--apex-permutation"],
                           lambda r: r.model.features[2].parametrizations.weight.original[:8, 0, 0, 0].tolist()),
    "--enable-apex": ("D", [], ["--enable-apex"], masks),
    "--dst": ("D", [], ["--dst", "rigl"], lambda r: type(r.sparsity.dst).__name__),
    "--sparsity-level": ("D", ["--dst", "rigl"], ["--sparsity-level", "0.8"], dst_kw),
    "--delta": ("D", ["--dst", "rigl"], ["--delta", "10"], dst_kw),
    "--alpha": ("D", ["--dst", "rigl"], ["--alpha", "0.5"], dst_kw),
    "--t-end": ("D", ["--dst", "rigl"], ["--t-end", "0.5"], dst_kw),
    "--distribution": ("D", ["--dst", "rigl"], ["--distribution", "uniform"], dst_kw),
    "--ablation": ("D", ["--dst", "srigl"], ["--ablation", "0.1"], dst_kw),
    "--dense-layers": ("D", ["--dst", "rigl"], ["--dense-layers", "features.2"], dst_kw),
    "--compile": ("D", [], ["--compile"], lambda r: r.train_model is r.model),
    "--channels-last": ("D", [], ["--channels-last"],
                        lambda r: r.model.features[2].weight.is_contiguous(memory_format=torch.channels_last)),
}
if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali"):  # DALI installed
    SETUP["--enable-dali"] = ("I", [], ["--enable-dali"], lambda r: type(r.train_loader).__name__)


@pytest.mark.parametrize("flag", sorted(SETUP))
def test_flag_changes_what_setup_builds(flag, img, weights_file):
    data, base, extra, probe = SETUP[flag]
    extra = [str(img) if t == "IMG" else weights_file if t == "WEIGHTS" else t for t in extra]
    before = probe(build(base, data, img))
    after = probe(build(base + extra, data, img))
    assert before != after, f"{flag} did not change the run"


FIT = {
    "--epochs": (["--epochs", "3"], lambda kw, a: a[5]),
    "--clip-grad-norm": (["--clip-grad-norm", "1"], lambda kw, a: kw["steps"].clip_grad_norm),
    "--accumulation-steps": (["--accumulation-steps", "2"], lambda kw, a: kw["steps"].accumulation_steps),
    "--print-freq": (["--print-freq", "3"], lambda kw, a: kw["output"].print_freq),
    "--output-dir": (["--output-dir", "OUT"], lambda kw, a: kw["output"].output_dir),
    "--channels-last": (["--channels-last"], lambda kw, a: kw["steps"].channels_last),
    "--seed": (["--seed", "5"], lambda kw, a: kw["seed"]),
}


@pytest.mark.parametrize("flag", sorted(FIT))
def test_flag_changes_how_fit_runs(flag, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli_train, "fit", lambda *a, **kw: calls.append((a, kw)) or [])
    extra, probe = FIT[flag]
    extra = [str(tmp_path / "out") if t == "OUT" else t for t in extra]
    base = ["--device", "cpu", "--epochs", "2", "--print-freq", "0"]
    assert cli_train.main(base) == 0
    assert cli_train.main(base + extra) == 0
    (a0, k0), (a1, k1) = calls
    assert probe(k0, a0) != probe(k1, a1)


REFUSED = {
    "--blocked-mmm": (["--blocked-mmm"], "semisparse export"),
    "--enable-dali": (["--enable-dali"], "ImageFolder trees"),  # digits; DALI runs are in test_dali.py
    "--dali-cpu": (["--dali-cpu"], "needs --enable-dali"),
    "--sync-bn": (["--sync-bn"], "drop it on CPU"),
    "--world-size": (["--world-size", "2"], "torchrun --nproc-per-node 2"),
    "--dist-url": (["--dist-url", "tcp://127.0.0.1:1234"], "torchrun"),
    "--device": (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nodev"], "--device"),
    "--override-ignore-linear": (["--override-ignore-linear"], "needs --sparsity"),
    "--wandb-project": (["--wandb-project", "x"], "needs --use-wandb"),
    "--wandb-log-dir": (["--wandb-log-dir", "x"], "needs --use-wandb"),
    "--overwrite": (["--overwrite"], "needs --output-dir"),  # its effect: test_cli_train_output_dir.py
    "--skip-bad-images": (["--skip-bad-images"], "applies to ImageFolder data only"),  # effect: test_data.py
}


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_refused_flags_name_the_alternative(flag, capsys):
    from semisparse.cli import main

    argv, message = REFUSED[flag]
    capsys.readouterr()
    assert main(["train", "--epochs", "1", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("argv, message", [
    (["--momentum", "0.5", "--opt", "adamw"], "no effect with --opt adamw"),
    (["--lr-min", "0.1"], "only applies to --lr-scheduler cosineannealinglr"),
    (["--lr-warmup-decay", "0.1"], "needs --lr-warmup-epochs"),
    (["--model-ema-decay", "0.9"], "needs --model-ema"),
    (["--ra-reps", "2"], "needs --ra-sampler"),
    (["--mask-tau", "2", "1"], "needs --sparsity gumbel_2x4"),
    (["--pattern", "2:4"], "needs --sparsity"),
    (["--ablation", "0.2", "--dst", "rigl"], "needs --dst srigl"),
    (["--trainable", "gumbel_2x4"], "needs --sparsity gumbel_2x4"),
    (["--mask-shared-rows", "4"], "needs --sparsity gumbel_2x4"),
    (["--mask-shared-rows", "0", "--sparsity", "gumbel_2x4"], "--mask-shared-rows must be in [1, 65536], got 0"),
    (["--auto-augment", "ra"], "not to the digits tensors"),
    (["--ignore-linear", "--override-ignore-linear", "--sparsity", "sparse_2x4"], "contradict"),
    (["--dst", "rigl", "--sparsity", "sparse_2x4"], "--dst builds its own masks"),
    (["--resume", "x.pth", "--start-epoch", "1"], "taken from the checkpoint"),
])
def test_flags_without_effect_are_refused(argv, message, capsys):
    from semisparse.cli import main

    capsys.readouterr()
    assert main(["train", "--epochs", "1", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("dst", ["rigl", "srigl", "static"])
def test_cli_dst_path_gives_the_api_masks_for_the_same_flags_and_seed(dst):
    flags = {"sparsity_level": 0.8, "distribution": "uniform", "dense_layers": ["features.0"]}
    argv = ["--dst", dst, "--sparsity-level", "0.8", "--distribution", "uniform", "--dense-layers", "features.0"]
    r = build([*argv, "--seed", "3"], "D", None)
    total = math.ceil(len(r.train_loader) / r.args.accumulation_steps) * r.args.epochs
    model = create_model("digits_cnn", num_classes=10)
    api = dst_api.from_flags(model, torch.optim.SGD(model.parameters(), lr=0.1), dst, total, seed=3, **flags)
    cli_masks, api_masks = ss.masks(r.model), ss.masks(model)
    assert cli_masks.keys() == api_masks.keys() and "features.0.weight" not in cli_masks
    for key in api_masks:
        assert torch.equal(cli_masks[key], api_masks[key]), key
    assert r.sparsity.dst.schedule == api.schedule and r.sparsity.dst.method == api.method
    other = build([*argv, "--seed", "4"], "D", None)  # the seed is used
    assert any(not torch.equal(m, ss.masks(other.model)[k]) for k, m in cli_masks.items())


def test_override_ignore_linear_is_the_default_behaviour(img):
    a = build(S, "D", img)
    b = build([*S, "--override-ignore-linear"], "D", img)
    assert masks(a) == masks(b) and "classifier.1.weight" in masks(a)


OTHER_TESTS = {
    "-h", "--config", "--debug", "--resume", "--test-only", "--use-wandb", "--apex-verbosity",
    "--override-ignore-linear", "--weight-decay", "--batch-size", "--workers", "--permute",
    "--keep-masks", "--keep-last",  # test_cli_workflow.py, test_cli_train_checks.py
}


def test_every_flag_is_covered():
    flags = {a.option_strings[0] for a in cli_train.get_args_parser()._actions}
    covered = set(SETUP) | set(FIT) | set(REFUSED) | OTHER_TESTS
    assert flags - covered == set()
