"""``semisparse train``: the torchvision reference training script's flags, with sparsity built in.

Reads top to bottom like torchvision's ``train.py``: ``get_args_parser()`` (one help line per flag),
``parse_args`` (``--config recipe.yaml`` first, the command line wins), ``validate`` (contradictory or
inapplicable flags are one-line errors: no flag is parsed and silently ignored), ``setup`` (data, model,
sparsity, optimizer, schedule, EMA, resume: nothing is written yet), ``main`` (train or ``--test-only``).

Two deliberate changes from the masking seed's ``train_sparse.py``: ``--sparsity sparse_2x4`` is
magnitude 2:4 with masks fixed at the start (from ``--weights`` when given: ASP's prune once, retrain);
and Linear layers are sparsified by default (``--ignore-linear`` restores the seed's behaviour;
``--override-ignore-linear`` is accepted and does nothing more).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from ..dst.api import DST_METHODS
from ..errors import SemisparseError
from ..masking import report as ss_report
from ..models import create_model, state_mismatch
from ..train import distributed as dist_utils
from ..train.checkpoint import check_arch, check_masks, load_checkpoint, set_rng_state
from ..train.dali import make_dali_loaders, require_dali
from ..train.data import AugmentOptions, DataSets, load_data
from ..train.engine import EMA, evaluate, fit, unwrap
from ..train.loaders import make_loaders
from ..train.metrics import MetricsLog, tensorboard_logger, wandb_logger
from ..train.optim import OPTIMIZERS, SCHEDULERS, build_lr_scheduler, build_optimizer
from ..train.run_folder import claim_output_dir
from ..train.sparsity import SparsityConfig, TrainingSparsity
from ..train.synthetic import synthetic_size

SPARSITY_CHOICES = ("none", "sparse_2x4", "gumbel_2x4")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    desc = "PyTorch classification training with semi-structured sparsity (torchvision reference flags)"
    p = argparse.ArgumentParser(prog="semisparse train", description=desc, add_help=add_help)
    a = p.add_argument
    a("--config", default=None, help="YAML recipe: a mapping of flag names to values; the command line wins")
    a("--data-path", default="digits", help="'digits' (bundled), an ImageFolder tree (train/, val/), a folder "
      "holding cifar-10-batches-py/, or 'synthetic[:N]' (random in-memory ImageNet-shaped images already on the "
      "device, to measure throughput) (default: digits)")
    a("--model", default=None, help="model name: torchvision, timm/<name>, resnet18_cifar, wrn22_2, digits_cnn "
      "(default: digits_cnn / resnet18_cifar / resnet18 for digits / CIFAR-10 / ImageFolder)")
    a("--device", default=None, help="device: cuda, cuda:N or cpu (default: cuda when available)")
    a("-b", "--batch-size", default=32, type=int, help="images per process; the total batch is NPROC x batch_size")
    a("--epochs", default=90, type=int, metavar="N", help="number of total epochs to run")
    a("-j", "--workers", default=None, type=int, metavar="N",
      help="data loading workers (default: 0 for digits, min(8, CPUs) otherwise)")
    a("--opt", default="sgd", type=str.lower, choices=OPTIMIZERS, help="optimizer")
    a("--lr", default=0.1, type=float, help="initial learning rate")
    a("--momentum", default=None, type=float, metavar="M", help="momentum of sgd/rmsprop (default: 0.9)")
    a("--wd", "--weight-decay", default=1e-4, type=float, metavar="W", dest="weight_decay",
      help="weight decay (default: 1e-4)")
    a("--norm-weight-decay", default=None, type=float, help="weight decay for normalization layers (default: --wd)")
    a("--bias-weight-decay", default=None, type=float, help="weight decay for biases (default: --wd)")
    a("--transformer-embedding-decay", default=None, type=float,
      help="weight decay for ViT embedding parameters (default: --wd)")
    a("--label-smoothing", default=0.0, type=float, help="label smoothing (default: 0.0)")
    a("--mixup-alpha", default=0.0, type=float, help="mixup alpha (default: 0.0)")
    a("--cutmix-alpha", default=0.0, type=float, help="cutmix alpha (default: 0.0)")
    a("--lr-scheduler", default="steplr", type=str.lower, choices=SCHEDULERS, help="the lr scheduler")
    a("--lr-warmup-epochs", default=0, type=int, help="the number of epochs to warm up (default: 0)")
    a("--lr-warmup-method", default=None, type=str.lower, choices=("constant", "linear"),
      help="the warm-up method (default: constant)")
    a("--lr-warmup-decay", default=None, type=float, help="the lr factor at the start of warm-up (default: 0.01)")
    a("--lr-step-size", default=None, type=int, help="steplr: decrease lr every step-size epochs (default: 30)")
    a("--lr-gamma", default=None, type=float, help="steplr/exponentiallr: lr factor (default: 0.1)")
    a("--lr-min", default=None, type=float, help="cosineannealinglr: minimum lr (default: 0.0)")
    a("--print-freq", default=10, type=int, help="print frequency in iterations (0: epoch lines only)")
    a("--output-dir", default=None, help="where checkpoints and metrics.jsonl go (default: nothing is written)")
    a("--overwrite", action="store_true", help="replace another run's files in --output-dir (removed only once "
      "this run's first checkpoint is written); without it such a folder is refused")
    a("--resume", default=None, help="path of a checkpoint to continue from")
    a("--start-epoch", default=None, type=int, metavar="N", help="start epoch (default: 0; from --resume)")
    a("--cache-dataset", action="store_true", help="cache an ImageFolder's file index for quicker start-up")
    a("--skip-bad-images", action="store_true", help="leave out ImageFolder files that cannot be decoded (each "
      "named once, counted at the end) instead of stopping at the first")
    a("--sync-bn", action="store_true", help="use SyncBatchNorm (torchrun on CUDA)")
    a("--test-only", action="store_true", help="only evaluate the model")
    a("--auto-augment", default=None, help="auto augment policy: ra, ta_wide, augmix, imagenet, cifar10, svhn")
    a("--ra-magnitude", default=None, type=int, help="magnitude of --auto-augment ra (default: 9)")
    a("--augmix-severity", default=None, type=int, help="severity of --auto-augment augmix (default: 3)")
    a("--random-erase", default=0.0, type=float, help="random erasing probability (default: 0.0)")
    a("--amp", action="store_true", help="mixed precision: bf16 on CPU, fp16 (with a GradScaler) on CUDA")
    a("--amp-dtype", default=None, choices=("float16", "bfloat16"), help="dtype of --amp (default: see --amp)")
    a("--world-size", default=None, type=int, help="number of processes; must match torchrun's")
    a("--dist-url", default=None, help="init_method of the process group (default: env://, torchrun's)")
    a("--model-ema", action="store_true", help="track an exponential moving average of the model")
    a("--model-ema-steps", default=None, type=int, help="optimizer steps between EMA updates (default: 32)")
    a("--model-ema-decay", default=None, type=float, help="EMA decay factor (default: 0.99998)")
    a("--use-deterministic-algorithms", action="store_true", help="forces deterministic algorithms only")
    a("--interpolation", default=None, type=str.lower, help="resize interpolation (default: bilinear)")
    a("--val-resize-size", default=None, type=int, help="ImageFolder validation resize (default: 256)")
    a("--val-crop-size", default=None, type=int, help="ImageFolder validation centre crop (default: 224)")
    a("--train-crop-size", default=None, type=int, help="training random crop (default: 224; CIFAR-10: 32)")
    a("--clip-grad-norm", default=None, type=float, help="the maximum gradient norm (default: None)")
    a("--ra-sampler", action="store_true", help="repeated augmentation sampler")
    a("--ra-reps", default=None, type=int, help="repetitions of --ra-sampler (default: 3)")
    a("--weights", default=None, help="a local weights file, or a torchvision weights enum name whose file is in "
      "the torch hub cache")
    a("--backend", default=None, type=str.lower, choices=("pil", "tensor"), help="PIL or tensor image pipeline")
    a("--use-v2", action="store_true", help="use torchvision.transforms.v2")
    a("--use-wandb", action="store_true", help="log to Weights & Biases (needs wandb installed)")
    a("--wandb-project", default=None, help="Weights & Biases project name (default: semisparse)")
    a("--wandb-log-dir", default=None, help="Weights & Biases log directory")
    a("--seed", default=0, type=int, help="seed of every RNG (data order, init, augmentation; default: 0)")
    a("--accumulation-steps", default=1, type=int, help="batches per optimizer step (default: 1)")
    # sparsity
    a("--sparsity", default="none", choices=SPARSITY_CHOICES,
      help="sparse_2x4: magnitude N:M masks fixed at the start; gumbel_2x4: learned N:M masks (default: none)")
    a("--pattern", default=None, help="N:M pattern for --sparsity / --dst srigl|sr-ste (default: 2:4)")
    a("--trainable", default=None, choices=("all", "gumbel_2x4", "none"),
      help="gumbel_2x4: train the masks only (weights frozen); all: masks and weights (default); none: evaluate")
    a("--mask-tau", default=None, nargs=2, type=float, metavar=("START", "END"),
      help="gumbel_2x4 temperature, annealed from START to END")
    a("--mask-prior", default=None, type=float, help="gumbel_2x4 magnitude prior strength of the mask logits")
    a("--mask-prior-from", default=None, choices=("magnitude", "wanda", "sparsegpt"),
      help="gumbel_2x4: the masks start as this one-shot mask (wanda/sparsegpt calibrate on 16 training batches; "
      "sparsegpt also starts from its reconstructed weights) (default: magnitude)")
    a("--aug-for-2x4", action="store_true", help="make convs whose channels are not a multiple of M N:M along "
      "kernel taps (padded)")
    a("--ignore-linear", action="store_true", help="keep Linear layers dense (the seed's default)")
    a("--override-ignore-linear", action="store_true", help="accepted for the seed's scripts: Linear layers are "
      "sparsified by default")
    a("--ignore-grouped", action="store_true", help="keep grouped convolutions dense")
    a("--apex-permutation", "--permute", action="store_true", dest="permute",
      help="channel permutation before N:M pruning (semisparse's own, no Apex)")
    a("--enable-apex", action="store_true", help="ASP one-shot magnitude 2:4 (done by semisparse, no Apex): "
      "the same as --sparsity sparse_2x4")
    a("--apex-verbosity", default=None, type=int, choices=(0, 1, 2, 3),
      help="sparsity report: 0 none, 1 one line, 2 per-layer table (default), 3 table + settings")
    a("--blocked-mmm", action="store_true", help="refused: masked layers train as ordinary convs; see --help")
    a("--dst", default=None, choices=DST_METHODS, help="dynamic sparse training (static: fixed random masks)")
    a("--sparsity-level", default=None, type=float, help="--dst rigl/srigl target sparsity (default: 0.9)")
    a("--delta", default=None, type=int, help="--dst: optimizer steps between mask updates (default: 100)")
    a("--alpha", default=None, type=float, help="--dst: initial prune fraction (default: 0.3)")
    a("--t-end", default=None, type=float, help="--dst: stop updating masks after this share of steps (0.75)")
    a("--distribution", default=None, choices=("erk", "uniform"), help="--dst layer sparsity budget (erk)")
    a("--ablation", default=None, type=float, help="--dst srigl: neuron ablation threshold gamma")
    a("--dense-layers", default=None, nargs="+", help="--dst: weights kept dense (e.g. conv1.weight fc.weight)")
    a("--compile", action="store_true", help="compile the model with torch.compile")
    a("--channels-last", action="store_true", help="use channels-last memory layout")
    a("--enable-dali", action="store_true", help="NVIDIA DALI data loading of an ImageFolder tree (needs "
      "nvidia-dali-cuda120 or nvidia-dali-cuda130)")
    a("--dali-cpu", action="store_true", help="decode and augment on the CPU (with --enable-dali; always so on CPU)")
    a("--debug", action="store_true", help="show tracebacks on error")
    return p


# --- parsing ----------------------------------------------------------------------------------------------


def recipe_path(name: str) -> str:
    """``--config`` value -> file: a path, or the name of a bundled recipe (``semisparse/recipes/*.yaml``)."""
    if os.path.exists(name):
        return name
    bundled = os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes")
    for candidate in (name, f"{name}.yaml"):
        path = os.path.join(bundled, os.path.basename(candidate))
        if os.path.isfile(path):
            return path
    return name


def _config_tokens(path: str, parser: argparse.ArgumentParser) -> tuple[list[str], set[str]]:
    """A YAML recipe as command-line tokens (so argparse validates it exactly like typed flags)."""
    import yaml

    path = recipe_path(path)
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except FileNotFoundError as exc:
        raise SemisparseError(f"--config {path} does not exist (a YAML file, or a recipe name from "
                              "semisparse/recipes/)") from exc
    except yaml.YAMLError as exc:
        raise SemisparseError(f"--config {path} is not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(cfg, dict):
        raise SemisparseError(f"--config {path} must be a mapping of flag names to values")
    by_name = {}
    for action in parser._actions:
        for opt in action.option_strings:
            by_name[opt.lstrip("-")] = action
            by_name[opt.lstrip("-").replace("-", "_")] = action
        by_name[action.dest] = action
    tokens, dests = [], set()
    for key, value in cfg.items():
        action = by_name.get(str(key))
        if action is None or action.dest in ("help", "config"):
            raise SemisparseError(f"--config {path}: unknown option {key!r} (use the flag names of --help)")
        flag = action.option_strings[-1] if action.option_strings[0] == "-b" else action.option_strings[0]
        dests.add(action.dest)
        if action.nargs == 0:
            if not isinstance(value, bool):
                raise SemisparseError(f"--config {path}: {key} is a switch; expected true or false")
            tokens += [flag] if value else []
        elif isinstance(value, (list, dict)):
            tokens += [flag, *_config_values(path, key, action, value)]
        elif value is not None:
            tokens += [flag, str(value)]
    return tokens, dests


def _config_values(path: str, key, action: argparse.Action, value) -> list[str]:
    """A recipe's list value as tokens, refused in one line when the flag takes another number of values."""
    if isinstance(value, dict) or action.nargs in (None, "?"):
        raise SemisparseError(f"--config {path}: {key} takes one value, got {value!r}")
    if isinstance(action.nargs, int) and len(value) != action.nargs:
        raise SemisparseError(f"--config {path}: {key} takes {action.nargs} values, got {value!r}")
    if not value:
        raise SemisparseError(f"--config {path}: {key} takes one or more values, got an empty list")
    return [str(v) for v in value]


def _check_config_tokens(path: str, tokens: list[str]) -> None:
    """Parse the recipe's tokens alone so a bad value is one line naming the recipe (not argparse's usage)."""
    checker = get_args_parser()

    def fail(message: str):
        raise SemisparseError(f"--config {path}: {message}")

    checker.error = fail  # argparse reports every bad value through error()
    checker.parse_args(tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``--config`` values first, the command line after them, so it wins).

    ``args.explicit`` is the set of options given on the command line or in the recipe.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    tokens: list[str] = []
    if known.config:
        tokens, _ = _config_tokens(known.config, parser)
        _check_config_tokens(recipe_path(known.config), tokens)
    full = tokens + argv
    args = parser.parse_args(full)
    probe = get_args_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    args.explicit = set(vars(probe.parse_args(full))) - {"config", "debug"}
    return args


# --- validation -------------------------------------------------------------------------------------------

_DEFAULTS = {"momentum": 0.9, "lr_warmup_method": "constant", "lr_warmup_decay": 0.01, "lr_step_size": 30,
             "lr_gamma": 0.1, "lr_min": 0.0, "start_epoch": 0, "ra_magnitude": 9, "augmix_severity": 3,
             "model_ema_steps": 32, "model_ema_decay": 0.99998, "interpolation": "bilinear", "ra_reps": 3,
             "backend": "pil", "trainable": "all", "apex_verbosity": 2, "dist_url": "env://",
             "sparsity_level": 0.9, "delta": 100, "alpha": 0.3, "t_end": 0.75, "distribution": "erk"}  # fmt: skip


def _flag(dest: str) -> str:
    return "--" + {"weight_decay": "wd", "permute": "apex-permutation"}.get(dest, dest.replace("_", "-"))


def _needs(args, dests: tuple[str, ...], ok: bool, why: str) -> None:
    """Refuse ``dests`` given explicitly when they would have no effect (``ok`` false)."""
    given = [d for d in dests if d in args.explicit]
    if given and not ok:
        raise SemisparseError(f"{', '.join(_flag(d) for d in given)} {why}")


def validate(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse contradictory or inapplicable flags, then fill the defaults that depend on others."""
    n = _needs
    if args.blocked_mmm:
        raise SemisparseError("--blocked-mmm is not needed: masked layers train as ordinary convolutions (no "
                              "im2col); for fast sparse inference use `semisparse export` / ss.deploy")  # fmt: skip
    n(args, ("dali_cpu",), args.enable_dali, "needs --enable-dali")
    if args.enable_dali:
        if args.data_path == "digits" or synthetic_size(args.data_path) is not None:
            raise SemisparseError("--enable-dali reads ImageFolder trees (train/, val/ class folders of images) "
                                  f"only, not --data-path {args.data_path}; drop it to use the built-in loaders")
        n(args, ("auto_augment", "random_erase", "backend", "use_v2"), False, "is not available with --enable-dali "
          "(its pipeline is random-resized-crop + flip); drop one of them")
        n(args, ("skip_bad_images",), False, "is not available with --enable-dali (DALI decodes the files itself); "
          "drop one of them")
        require_dali()
    for name in ("batch_size", "epochs", "accumulation_steps"):
        if getattr(args, name) < 1:
            raise SemisparseError(f"{_flag(name)} must be at least 1, got {getattr(args, name)}")
    if args.workers is not None and args.workers < 0:
        raise SemisparseError(f"-j/--workers must be >= 0, got {args.workers}")
    # optimizer / schedule
    n(args, ("momentum",), args.opt != "adamw", "has no effect with --opt adamw (use sgd, sgd_nesterov or rmsprop)")
    n(args, ("lr_step_size",), args.lr_scheduler == "steplr", "only applies to --lr-scheduler steplr")
    n(args, ("lr_gamma",), args.lr_scheduler in ("steplr", "exponentiallr"),
      "only applies to --lr-scheduler steplr or exponentiallr")
    n(args, ("lr_min",), args.lr_scheduler == "cosineannealinglr", "only applies to --lr-scheduler cosineannealinglr")
    n(args, ("lr_warmup_method", "lr_warmup_decay"), args.lr_warmup_epochs > 0, "needs --lr-warmup-epochs > 0")
    n(args, ("model_ema_steps", "model_ema_decay"), args.model_ema, "needs --model-ema")
    n(args, ("ra_reps",), args.ra_sampler, "needs --ra-sampler")
    n(args, ("ra_magnitude",), args.auto_augment == "ra", "needs --auto-augment ra")
    n(args, ("augmix_severity",), args.auto_augment == "augmix", "needs --auto-augment augmix")
    n(args, ("amp_dtype",), args.amp, "needs --amp")
    n(args, ("overwrite",), bool(args.output_dir), "needs --output-dir (it replaces another run's files there)")
    n(args, ("overwrite",), not args.test_only, "does nothing with --test-only (it writes no file)")
    n(args, ("wandb_project", "wandb_log_dir"), args.use_wandb, "needs --use-wandb")
    if args.test_only and args.model_ema and not args.resume:
        raise SemisparseError("--model-ema with --test-only evaluates the EMA saved in a checkpoint; add --resume")
    if args.resume:
        n(args, ("start_epoch",), False, "is taken from the checkpoint with --resume; drop one of them")
        n(args, ("weights",), False, "initialises a fresh run; --resume continues one: drop one of them")
    # sparsity
    if args.enable_apex:
        if args.sparsity == "gumbel_2x4":
            raise SemisparseError("--enable-apex (one-shot magnitude 2:4) contradicts --sparsity gumbel_2x4; "
                                  "drop one of them")  # fmt: skip
        args.sparsity = "sparse_2x4"
    n(args, ("apex_verbosity",), args.sparsity != "none" or args.dst is not None, "needs --sparsity, --enable-apex "
      "or --dst (it sets how much of the sparsity report is printed)")
    if args.ignore_linear and args.override_ignore_linear:
        raise SemisparseError("--ignore-linear and --override-ignore-linear contradict each other; drop one")
    masked = args.sparsity != "none" or args.dst is not None
    n(args, ("ignore_linear", "ignore_grouped", "aug_for_2x4", "override_ignore_linear"), masked,
      "needs --sparsity sparse_2x4|gumbel_2x4, --enable-apex or --dst")
    n(args, ("pattern",), args.sparsity != "none" or args.dst in ("srigl", "sr-ste"),
      "needs --sparsity sparse_2x4 (magnitude) or gumbel_2x4 (learned), or --dst srigl|sr-ste")
    n(args, ("permute",), args.sparsity != "none", "needs --sparsity sparse_2x4|gumbel_2x4 or --enable-apex")
    n(args, ("mask_tau", "mask_prior", "mask_prior_from"), args.sparsity == "gumbel_2x4", "needs --sparsity gumbel_2x4")
    if args.dst and args.sparsity == "gumbel_2x4":
        raise SemisparseError("--dst cannot be combined with --sparsity gumbel_2x4: choose learned masks or DST")
    if args.dst and args.sparsity == "sparse_2x4":
        raise SemisparseError("--dst builds its own masks; drop --sparsity sparse_2x4/--enable-apex or --dst")
    n(args, ("sparsity_level", "distribution", "dense_layers"), args.dst in ("rigl", "srigl", "static"),
      "needs --dst rigl, srigl or static")
    n(args, ("delta", "alpha", "t_end"), args.dst in ("rigl", "srigl"), "needs --dst rigl or srigl")
    n(args, ("ablation",), args.dst == "srigl", "needs --dst srigl")
    if args.trainable == "gumbel_2x4" and args.sparsity != "gumbel_2x4":
        raise SemisparseError("--trainable gumbel_2x4 (train the masks only) needs --sparsity gumbel_2x4")
    for key, value in _DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.trainable == "none":
        args.test_only = True
    if args.test_only and not (args.weights or args.resume):
        # a fresh model is randomly initialised: its score means nothing and would be easy to mistake for one
        flag = "--trainable none" if args.trainable == "none" else "--test-only"
        raise SemisparseError(f"{flag} evaluates a trained model: give --weights FILE (or a torchvision weights "
                              "name) or --resume CHECKPOINT; without them the model is randomly initialised")
    return args


# --- set-up -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything ``main`` needs, built by :func:`setup` (no file written yet)."""

    args: argparse.Namespace
    dist: dist_utils.DistInfo
    device: torch.device
    data: DataSets
    train_loader: object
    val_loader: object
    model: nn.Module  # plain model (checkpoints)
    train_model: nn.Module  # compiled and/or DDP-wrapped
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    sparsity: TrainingSparsity
    amp_dtype: torch.dtype | None = None
    scaler: object = None
    ema: EMA | None = None
    batch_transform: object = None
    start_epoch: int = 0
    step: int = 0
    loggers: list = field(default_factory=list)
    report: object = None


def _device(args) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SemisparseError(f"unknown --device {name!r}; expected cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SemisparseError("--device cuda, but no CUDA device is available; use --device cpu")
    return device


def _data(args) -> DataSets:
    is_digits = args.data_path == "digits"
    image_flags = ("train_crop_size", "interpolation", "auto_augment", "ra_magnitude", "augmix_severity",
                   "random_erase", "backend", "use_v2", "val_resize_size", "val_crop_size", "cache_dataset")
    _needs(args, image_flags, not is_digits, "applies to image data (ImageFolder, CIFAR-10), not to the digits tensors")
    synthetic = synthetic_size(args.data_path) is not None
    _needs(args, tuple(f for f in (*image_flags, "ra_sampler", "ra_reps") if not f.endswith("crop_size")),
           not synthetic, "has no effect on --data-path synthetic (random tensors; only the crop sizes apply)")
    is_cifar = not is_digits and not synthetic and (
        os.path.basename(os.path.normpath(args.data_path)) == "cifar-10-batches-py"
        or os.path.isdir(os.path.join(args.data_path, "cifar-10-batches-py"))
    )
    _needs(args, ("val_resize_size", "val_crop_size", "cache_dataset"), not is_cifar,
           "applies to ImageFolder data only (CIFAR-10 is validated at 32x32 as is)")
    _needs(args, ("skip_bad_images",), not is_digits and not is_cifar,
           "applies to ImageFolder data only (CIFAR-10 batches and digits are checked whole when loaded)")
    _needs(args, ("interpolation",), not is_cifar or args.auto_augment is not None,
           "only affects ImageFolder resizing or --auto-augment on CIFAR-10")
    augment = AugmentOptions(
        train_crop_size=args.train_crop_size, val_resize_size=args.val_resize_size, val_crop_size=args.val_crop_size,
        interpolation=args.interpolation, auto_augment=args.auto_augment, ra_magnitude=args.ra_magnitude,
        augmix_severity=args.augmix_severity, random_erase=args.random_erase, backend=args.backend,
        use_v2=args.use_v2,
    )  # fmt: skip
    return load_data(args.data_path, augment, cache=args.cache_dataset)


def _model(args, data: DataSets) -> nn.Module:
    name = args.model or {"digits": "digits_cnn", "cifar10": "resnet18_cifar"}.get(data.kind, "resnet18")
    args.model = name
    kw = {"in_channels": 3} if name == "digits_cnn" and data.kind != "digits" else {}
    model = create_model(name, num_classes=data.num_classes, weights=args.weights, **kw)
    if data.kind == "digits" and name != "digits_cnn":
        raise SemisparseError(f"--data-path digits holds 8x8 one-channel images; use --model digits_cnn, not {name}")
    return model


def _sparsity_config(args) -> SparsityConfig:
    method = {"none": "none", "sparse_2x4": "magnitude", "gumbel_2x4": "gumbel"}[args.sparsity]
    return SparsityConfig(
        method=method, pattern=args.pattern or ("2:4" if method != "none" or args.dst == "sr-ste" else None),
        trainable="mask" if args.trainable == "gumbel_2x4" else "all",
        tau=tuple(args.mask_tau) if args.mask_tau else None, prior=args.mask_prior, permute=args.permute,
        prior_from=args.mask_prior_from,
        pad=args.aug_for_2x4, ignore_linear=args.ignore_linear, ignore_grouped=args.ignore_grouped, dst=args.dst,
        level=args.sparsity_level, delta=args.delta, alpha=args.alpha, t_end=args.t_end,
        distribution=args.distribution, ablation=args.ablation, dense_layers=list(args.dense_layers or []),
        seed=args.seed,
    )  # fmt: skip


def _batch_transform(args, num_classes: int):
    from torchvision.transforms import v2

    ops = []
    if args.mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=args.mixup_alpha, num_classes=num_classes))
    if args.cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=args.cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
    return lambda x, y: op(x, y)


def _print_report(args, sparsity: TrainingSparsity, report) -> None:
    if report is None or not dist_utils.is_main():
        return
    v = args.apex_verbosity
    if v >= 1:
        mac = f", {report.mac_share:.1%} of MACs" if report.mac_share is not None else ""
        print(f"sparsity: {len(report.sparse_layers)} layers masked, {report.param_share:.1%} of parameters{mac}, "
              f"kept density {report.density:.3f}")  # fmt: skip
    if v >= 2:
        print(report)
    if v >= 3:
        print(f"sparsity settings: {sparsity.config}")


def _resume(run: Run, path: str) -> None:
    ckpt = load_checkpoint(path)
    check_arch(ckpt, run.model.semisparse_arch, path)
    saved = (ckpt.get("args") or {})
    for key in ("sparsity", "dst", "pattern", "opt", "lr_scheduler"):
        if key in saved and saved[key] != getattr(run.args, key):
            raise SemisparseError(f"checkpoint {path} was trained with {_flag(key)} {saved[key]}; resume with the "
                                  f"same flag (this run has {getattr(run.args, key)})")  # fmt: skip
    wrong = state_mismatch({k: tuple(v.shape) for k, v in run.model.state_dict().items()},
                           {k: tuple(v.shape) for k, v in ckpt["model"].items()})  # fmt: skip
    if wrong:
        raise SemisparseError(f"checkpoint {path} does not fit this run's model ({wrong})")
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if run.lr_scheduler is not None and ckpt.get("lr_scheduler"):
            run.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise SemisparseError(f"checkpoint {path} does not fit this run: {str(exc).splitlines()[0]}") from exc
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None:
        if not ckpt.get("ema"):
            raise SemisparseError(f"checkpoint {path} has no EMA state; resume without --model-ema")
        run.ema.load_state_dict(ckpt["ema"])
    state = (ckpt.get("sparsity") or {}).get("state")
    if state:
        run.sparsity.load_state_dict(state)
    check_masks(run.model, path)  # a mask that breaks the declared pattern is refused before training
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    run.start_epoch = int(ckpt["epoch"]) + 1
    run.step = int(ckpt.get("step", 0))


def setup(args: argparse.Namespace) -> Run:
    """Build the run from validated ``args``; raises :class:`SemisparseError` before anything is written."""
    device = _device(args)
    if args.sync_bn and device.type != "cuda":
        raise SemisparseError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); drop it on CPU")
    _needs(args, ("dist_url",), "RANK" in os.environ, "is only used under torchrun (`torchrun --nproc-per-node N "
           "-m semisparse train ...`)")
    info = dist_utils.init_distributed(device.type, args.dist_url, args.world_size)
    if info.distributed and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if args.sync_bn and not info.distributed:
        raise SemisparseError("--sync-bn synchronises BatchNorm across processes; launch with torchrun or drop it")
    if args.use_deterministic_algorithms:
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    data = _data(args)
    workers = args.workers
    if workers is None:
        workers = 0 if data.kind == "digits" else min(8, os.cpu_count() or 1)
    if args.enable_dali:
        train_loader, val_loader = make_dali_loaders(
            data, args.batch_size, crop_size=args.train_crop_size, val_resize_size=args.val_resize_size,
            val_crop_size=args.val_crop_size, interpolation=args.interpolation, device=device,
            dali_cpu=args.dali_cpu, num_threads=workers, seed=args.seed, rank=info.rank, world=info.world_size,
            ra_reps=args.ra_reps if args.ra_sampler else 1,
        )  # fmt: skip
    else:
        train_loader, val_loader = make_loaders(
            data, args.batch_size, workers, seed=args.seed, rank=info.rank, world=info.world_size,
            ra_reps=args.ra_reps if args.ra_sampler else 1, skip_bad_images=args.skip_bad_images, device=device,
        )  # fmt: skip
    model = _model(args, data)
    steps_per_epoch = math.ceil(len(train_loader) / args.accumulation_steps)
    total_steps = max(1, steps_per_epoch * args.epochs)
    model.to(device)
    sparsity = TrainingSparsity(_sparsity_config(args))
    example = next(iter(val_loader))[0][:1].to(device)
    report = sparsity.apply(model, total_steps, example_input=example, calibration=train_loader)
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args.opt, args.lr, args.momentum, args.weight_decay, args.norm_weight_decay,
                                args.bias_weight_decay, args.transformer_embedding_decay)  # fmt: skip
    sparsity.attach(model, optimizer, total_steps)
    if report is None and sparsity.dst is not None:
        report = ss_report(model, example_input=example)
    lr_scheduler = build_lr_scheduler(
        optimizer, args.lr_scheduler, args.epochs, args.lr_warmup_epochs, args.lr_warmup_method,
        args.lr_warmup_decay, args.lr_step_size, args.lr_gamma, args.lr_min,
    )  # fmt: skip
    amp_dtype = None
    if args.amp:
        amp_dtype = getattr(torch, args.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16"))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None
    ema = None
    if args.model_ema:
        adjust = info.world_size * args.batch_size * args.model_ema_steps / args.epochs
        alpha = min(1.0, (1.0 - args.model_ema_decay) * adjust)
        ema = EMA(model, 1.0 - alpha)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    run = Run(args, info, device, data, train_loader, val_loader, model, model, criterion, optimizer, lr_scheduler,
              sparsity, amp_dtype, scaler, ema, _batch_transform(args, data.num_classes),
              start_epoch=args.start_epoch, report=report)  # fmt: skip
    if args.resume:
        _resume(run, args.resume)
    train_model = model
    if args.compile:  # one graph or an error (see main): never a silently slower partial compile
        train_model = torch.compile(train_model, fullgraph=True)
    if info.distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=ids)
    run.train_model = train_model
    _print_report(args, sparsity, report)
    return run


def _loggers(args) -> list:
    loggers = []
    if args.output_dir and dist_utils.is_main():
        tb = tensorboard_logger(args.output_dir)
        if tb is not None:
            loggers.append(tb)
    if args.use_wandb and dist_utils.is_main():
        cfg = {k: v for k, v in vars(args).items() if k != "explicit"}
        loggers.append(wandb_logger(args.wandb_project, args.wandb_log_dir, cfg))
    return loggers


def plain_args(args: argparse.Namespace) -> dict:
    """The options as a plain dict (what a checkpoint stores)."""
    out = {}
    for k, v in vars(args).items():
        if k == "explicit":
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.use_wandb:  # fail before any work when wandb is missing
        try:
            import wandb  # noqa: F401
        except ImportError:
            wandb_logger(None, None, {})
    validate(args)
    folder = None
    if args.output_dir and not args.test_only:  # before any work: another run's folder is refused at once
        folder = claim_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite,
                                  clean=os.environ.get("RANK", "0") == "0")  # fmt: skip
    try:
        run = setup(args)
        if args.test_only:
            return _test_only(run)
        loggers = _loggers(args)
        if args.output_dir and dist_utils.is_main():
            log = MetricsLog(args.output_dir)
            log.start(run.start_epoch)
            loggers.insert(0, log)
        elif dist_utils.is_main():
            print("no --output-dir: no checkpoint or metrics file is written", flush=True)
        if run.start_epoch >= args.epochs and dist_utils.is_main():
            print(f"nothing to train: start epoch {run.start_epoch} >= --epochs {args.epochs}")
        fit(
            run.train_model, run.train_loader, run.val_loader, run.optimizer, run.lr_scheduler, args.epochs,
            sparsity=run.sparsity, criterion=run.criterion, device=run.device, start_epoch=run.start_epoch,
            step=run.step, amp_dtype=run.amp_dtype, scaler=run.scaler, accumulation_steps=args.accumulation_steps,
            clip_grad_norm=args.clip_grad_norm, channels_last=args.channels_last, ema=run.ema,
            ema_steps=args.model_ema_steps, ema_warmup_epochs=args.lr_warmup_epochs,
            batch_transform=run.batch_transform, seed=args.seed, rank=run.dist.rank, output_dir=args.output_dir,
            args=plain_args(args), loggers=loggers, print_freq=args.print_freq,
            save_checkpoint=folder.save if folder is not None else None,
        )  # fmt: skip
        _report_skipped(run)
    except Exception as exc:
        if args.compile and type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SemisparseError(f"--compile: torch.compile cannot compile this model and sparsity mode as one graph "
                                  f"({first}); drop --compile") from exc  # fmt: skip
        raise
    finally:
        dist_utils.cleanup()
    return 0


def _report_skipped(run: Run) -> None:
    skipped = getattr(run.train_loader, "skipped", None)  # shared by both loaders (ImageFolder data)
    if skipped is not None:
        print(skipped.summary(), file=sys.stderr, flush=True)


def _test_only(run: Run) -> int:
    ev = evaluate(run.train_model, run.criterion, run.val_loader, run.device, amp_dtype=run.amp_dtype,
                  channels_last=run.args.channels_last)  # fmt: skip
    if dist_utils.is_main():
        print(f"test: val_loss {ev['loss']:.4f} val_acc1 {ev['acc1']:.2f} val_acc5 {ev['acc5']:.2f} "
              f"({ev['count']} images)")  # fmt: skip
        if run.ema is not None and run.args.resume:
            ee = evaluate(run.ema.module, run.criterion, run.val_loader, run.device, amp_dtype=run.amp_dtype)
            print(f"test (EMA): val_loss {ee['loss']:.4f} val_acc1 {ee['acc1']:.2f} val_acc5 {ee['acc5']:.2f}")
    _report_skipped(run)
    return 0


__all__ = ["get_args_parser", "parse_args", "validate", "setup", "main", "Run", "unwrap"]
