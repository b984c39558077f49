"""``semisparse train``: the torchvision reference training script's flags, with sparsity built in.

Reads top to bottom like torchvision's ``train.py``: ``get_args_parser()`` (one help line per flag),
``parse_args`` (``--config recipe.yaml`` first, the command line wins), ``validate`` (contradictory or
inapplicable flags are one-line errors: no flag is parsed and silently ignored), ``setup`` (data, model,
sparsity, optimizer, schedule, EMA, resume: nothing is written yet), ``main`` (train or ``--test-only``).

Two deliberate changes from the masking paper's ``train_sparse.py``: ``--sparsity sparse_2x4`` is
magnitude 2:4 with masks fixed at the start (from ``--weights`` when given: ASP's prune once, retrain);
and Linear layers are sparsified by default (``--ignore-linear`` restores the scripts' behaviour;
``--override-ignore-linear`` is accepted and does nothing more).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..dst.budgets import DISTRIBUTIONS
from ..dst.selection import LayerSelection
from ..dst.settings import DST_METHODS, SRSTE_PATTERN, DSTSettings, refuse_masks
from ..errors import SemisparseError
from ..masking import report as ss_report
from ..models import create_model, state_mismatch
from ..train import distributed as dist_utils
from ..train.checkpoint import check_arch, check_masks, check_resumable, load_checkpoint, set_rng_state
from ..train.checkpoint import entry as ckpt_entry
from ..train.dali import make_dali_loaders, require_dali
from ..train.data import AugmentOptions, DataSets, load_data
from ..train.engine import EMA, RunOutput, StepOptions, evaluate, fit, unwrap
from ..train.loaders import make_loaders
from ..train.metrics import MetricsLog, tensorboard_logger, wandb_logger
from ..train.optim import OPTIMIZERS, SCHEDULERS, build_lr_scheduler, build_optimizer
from ..train.run_folder import claim_output_dir, same_dir
from ..train.sparsity import SparsityConfig, TrainingSparsity
from ..train.synthetic import synthetic_size
from ..train.weights import WeightsInfo, carries_masks, load_run_weights
from . import args as args_mod
from .args import short as _short

SPARSITY_CHOICES = ("none", "sparse_2x4", "gumbel_2x4")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    desc = "PyTorch classification training with semi-structured sparsity (torchvision reference flags)"
    p = OneLineParser(prog="semisparse train", description=desc, add_help=add_help, formatter_class=HelpFormatter)
    groups = {title: p.add_argument_group(title) for title in HELP_GROUPS}

    def a(*flags: str, **kw: object) -> argparse.Action:
        dest = kw.get("dest") or next((f for f in flags if f.startswith("--")), flags[0]).lstrip("-").replace("-", "_")
        return groups[help_group(str(dest))].add_argument(*flags, **kw)

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
    a("--mask-shared-rows", default=None, type=int, metavar="N",
      help="gumbel_2x4: each block of N consecutive output neurons learns one mask (4: the CPU deploy's rows4 "
      "kernels read each input once for the block)")
    a("--mask-prior-from", default=None, choices=("magnitude", "wanda", "sparsegpt"),
      help="gumbel_2x4: the masks start as this one-shot mask (wanda/sparsegpt calibrate on 16 training batches; "
      "sparsegpt also starts from its reconstructed weights) (default: magnitude)")
    a("--aug-for-2x4", action="store_true", help="make convs whose channels are not a multiple of M N:M along "
      "kernel taps (padded)")
    a("--ignore-linear", action="store_true", help="keep Linear layers dense (the masking paper's scripts' default)")
    a("--override-ignore-linear", action="store_true",
      help="accepted for the masking paper's scripts: Linear layers are sparsified by default")
    a("--ignore-grouped", action="store_true", help="keep grouped convolutions dense")
    a("--apex-permutation", "--permute", action="store_true", dest="permute",
      help="channel permutation before N:M pruning (semisparse's own, no Apex)")
    a("--enable-apex", action="store_true", help="ASP one-shot magnitude 2:4 (done by semisparse, no Apex): "
      "the same as --sparsity sparse_2x4")
    a("--apex-verbosity", default=None, type=int, choices=(0, 1, 2, 3),
      help="sparsity report: 0 none, 1 one line, 2 per-layer table (default), 3 table + settings")
    a("--blocked-mmm", action="store_true", help="refused: masked layers train as ordinary convs; see --help")
    # --dst and its options: values, defaults and checks are DSTSettings' (checked once, in validate)
    a("--dst", default=None, metavar="{" + ",".join(DST_METHODS) + "}",
      help="dynamic sparse training (static: fixed random masks)")
    a("--sparsity-level", default=None, type=float, help="--dst rigl/srigl target sparsity")
    a("--delta", default=None, type=int, help="--dst: optimizer steps between mask updates")
    a("--alpha", default=None, type=float, help="--dst: initial prune fraction")
    a("--t-end", default=None, type=float, help="--dst: stop updating masks after this share of all optimizer steps")
    a("--distribution", default=None, metavar="{" + ",".join(DISTRIBUTIONS) + "}",
      help="--dst layer sparsity budget")
    a("--ablation", default=None, type=float, help="--dst srigl: neuron ablation threshold gamma")
    a("--dense-layers", default=None, nargs="+", help="--dst: weights kept dense (e.g. conv1.weight fc.weight)")
    a("--compile", action="store_true", help="compile the model with torch.compile")
    a("--channels-last", action="store_true", help="use channels-last memory layout")
    a("--enable-dali", action="store_true", help="NVIDIA DALI data loading of an ImageFolder tree (needs "
      "nvidia-dali-cuda120 or nvidia-dali-cuda130)")
    a("--dali-cpu", action="store_true", help="decode and augment on the CPU (with --enable-dali; always so on CPU)")
    a("--keep-masks", default=None, action=argparse.BooleanOptionalAction,
      help="with --weights of a semisparse checkpoint or compressed file: keep its masks (learned ones as their "
      "argmax) fixed while fine-tuning, or continue from them with --sparsity sparse_2x4 / --dst sr-ste of the "
      "same pattern; --no-keep-masks loads its effective weights (masked entries zero) without masks (default: "
      "keep when the file carries masks)")
    a("--keep-last", default=None, type=int, metavar="N",
      help="keep only the newest N model_EPOCH.pth files (checkpoint.pth is always kept) (default: keep all)")
    a("--debug", action="store_true", help="show tracebacks on error")
    return p


# --- help ---------------------------------------------------------------------------------------------------

#: --help sections, in order (as torchvision's reference scripts group their flags); a flag goes to the first
#: section whose dests or dest prefixes name it, else to "other".
HELP_GROUPS = {
    "data": ("data_path", "batch_size", "workers", "cache_dataset", "skip_bad_images", "auto_augment",
             "ra_magnitude", "augmix_severity", "random_erase", "interpolation", "val_resize_size",
             "val_crop_size", "train_crop_size", "ra_sampler", "ra_reps", "backend", "use_v2", "mixup_alpha",
             "cutmix_alpha", "enable_dali", "dali_cpu"),
    "model": ("model", "weights", "keep_masks", "device", "amp", "amp_dtype", "compile", "channels_last",
              "sync_bn", "model_ema", "model_ema_steps", "model_ema_decay"),
    "optimisation": ("epochs", "opt", "lr", "momentum", "weight_decay", "norm_weight_decay", "bias_weight_decay",
                     "transformer_embedding_decay", "label_smoothing", "lr_", "clip_grad_norm",
                     "accumulation_steps", "seed", "use_deterministic_algorithms"),
    "sparsity (masks fixed or learned)": ("sparsity", "pattern", "aug_for_2x4", "ignore_linear",
                                          "override_ignore_linear", "ignore_grouped", "permute", "enable_apex",
                                          "apex_verbosity", "blocked_mmm"),
    "learned masks (--sparsity gumbel_2x4)": ("trainable", "mask_"),
    "dynamic sparse training (--dst)": ("dst", "sparsity_level", "delta", "alpha", "t_end", "distribution",
                                        "ablation", "dense_layers"),
    "run, output and deploy": ("config", "output_dir", "overwrite", "resume", "start_epoch", "test_only",
                               "print_freq", "keep_last", "use_wandb", "wandb_", "world_size", "dist_url",
                               "debug"),
    "other": (),
}  # fmt: skip


def help_group(dest: str) -> str:
    for title, names in HELP_GROUPS.items():
        if any(dest == n or (n.endswith("_") and dest.startswith(n)) for n in names):
            return title
    return "other"


def _help_defaults() -> dict:
    """Defaults set below the CLI (the library's), shown in --help."""
    from ..masking.gumbel import DEFAULTS as GUMBEL

    dst = {dest: getattr(DSTSettings, name) for dest, name in DST_ARGS.items()}
    return {"mask_tau": " ".join(f"{t:g}" for t in GUMBEL["tau"]), "mask_prior": GUMBEL["prior"],
            "mask_shared_rows": GUMBEL["shared_rows"],
            "pattern": SRSTE_PATTERN, "ablation": DSTSettings.ablation, "world_size": "torchrun's", "config": "none",
            "dst": "none (dense or --sparsity)", **dst}


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's default in its help line: the real default when the flag's value is None until
    :func:`validate` fills it, nothing more when the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction)):
            return text
        default = action.default if action.default is not None else _DEFAULTS.get(action.dest)
        if default is None:
            default = _help_defaults().get(action.dest)
        if isinstance(default, (list, tuple)):
            default = " ".join(str(d) for d in default)
        return f"{text} (default: {'none' if default is None else default})".replace("%", "%%")


class OneLineParser(args_mod.OneLineParser):
    """``semisparse train``'s parser: one-line errors, with a hint for ``--sparsity 2:4``."""

    def hint(self, message: str) -> str:
        if "argument --sparsity" in message and "invalid choice" in message:
            return (message + "; an N:M pattern is spelled --sparsity sparse_2x4 (magnitude, fixed) or gumbel_2x4 "
                    "(learned), with --pattern N:M for another N:M")  # fmt: skip
        return message


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

    path = recipe_path(path)
    cfg = _read_recipe(path)
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
            raise SemisparseError(f"--config {path}: unknown option {_short(repr(key), 60)} (use the flag names of "
                                  "--help)")  # fmt: skip
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


#: A recipe is a handful of flags: a larger file is not one.
MAX_RECIPE_BYTES = 1 << 20


def _read_recipe(path: str) -> object:
    """The YAML mapping of ``path``: a small UTF-8 text file without anchors or aliases (so a few bytes
    cannot expand into gigabytes), else one line saying what is wrong."""
    import yaml

    if os.path.isdir(path):
        raise SemisparseError(f"--config {path} is a folder; expected a YAML file (or a recipe name)")
    if not os.path.isfile(path):
        raise SemisparseError(f"--config {path} does not exist (a YAML file, or a recipe name from "
                              "semisparse/recipes/)")  # fmt: skip
    with open(path, "rb") as f:
        raw = f.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise SemisparseError(f"--config {path} is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a YAML "
                              "mapping of a few flags")  # fmt: skip
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SemisparseError(f"--config {path} is not a text file (not UTF-8); expected a YAML recipe") from None
    if "\0" in text:
        raise SemisparseError(f"--config {path} is not a text file (it holds NUL bytes); expected a YAML recipe")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise SemisparseError(f"--config {path}: YAML anchors and aliases (&name, *name) are not allowed "
                                      "in a recipe; write each value out")  # fmt: skip
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SemisparseError(f"--config {path} is not valid YAML ({_short(str(exc).splitlines()[0])})") from None


def _config_values(path: str, key, action: argparse.Action, value) -> list[str]:
    """A recipe's list value as tokens, refused in one line when the flag takes another number of values."""
    if isinstance(value, dict) or action.nargs in (None, "?"):
        raise SemisparseError(f"--config {path}: {key} takes one value, got {_short(repr(value), 80)}")
    if isinstance(action.nargs, int) and len(value) != action.nargs:
        raise SemisparseError(f"--config {path}: {key} takes {action.nargs} values, got {_short(repr(value), 80)}")
    if not value:
        raise SemisparseError(f"--config {path}: {key} takes one or more values, got an empty list")
    return [str(v) for v in value]


def _check_config_tokens(path: str, tokens: list[str]) -> None:
    """Parse the recipe's tokens alone so a bad value is one line naming the recipe (not argparse's usage)."""
    checker = get_args_parser()

    def fail(message: str):
        raise SemisparseError(f"--config {path}: {_short(message)}")

    checker.error = fail  # argparse reports every bad value through error()
    checker.parse_args(tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``--config`` values first, the command line after them, so it wins).

    ``args.explicit`` is the set of options given on the command line or in the recipe.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    pre = OneLineParser(prog="semisparse train", add_help=False)
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
    if args.resume:
        _defaults_from_checkpoint(args)
    return args


#: Options a resumed or evaluated run never takes from the checkpoint: where and how this process runs.
_NOT_FROM_CHECKPOINT = frozenset({"resume", "test_only", "output_dir", "overwrite", "weights", "keep_masks",
                                  "start_epoch", "config", "debug", "device", "world_size", "dist_url",
                                  "use_wandb", "wandb_project", "wandb_log_dir", "explicit"})  # fmt: skip


def _read_checkpoint(path: str) -> dict:
    """:func:`load_checkpoint`, read once for the option defaults, the model's masks and the resume."""
    if not os.path.isfile(path):
        return load_checkpoint(path)  # its one-line error
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    cached = getattr(_read_checkpoint, "cache", None)
    if cached is None or cached[0] != key:
        cached = _read_checkpoint.cache = (key, load_checkpoint(path))
    return cached[1]


def _defaults_from_checkpoint(args: argparse.Namespace) -> None:
    """``--resume CKPT``: every option not given takes the checkpoint's value (model, data, sparsity,
    optimizer...), so ``--resume CKPT`` or ``--test-only --resume CKPT`` needs no other flag. What is given
    on the command line or in ``--config`` wins (and is checked against the checkpoint by the resume)."""
    if not os.path.isfile(args.resume):
        return  # the resume itself says what is wrong
    ckpt = _read_checkpoint(args.resume)
    saved = ckpt.get("args") or {}
    args.from_checkpoint = set()
    for key, value in saved.items():
        if key in _NOT_FROM_CHECKPOINT or key in args.explicit or not hasattr(args, key):
            continue
        if not (value is None or isinstance(value, (bool, int, float, str))
                or isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value)):
            continue  # a plain value or nothing: a file never injects an object
        setattr(args, key, value)
        args.from_checkpoint.add(key)


# --- validation -------------------------------------------------------------------------------------------

_DEFAULTS = {"momentum": 0.9, "lr_warmup_method": "constant", "lr_warmup_decay": 0.01, "lr_step_size": 30,
             "lr_gamma": 0.1, "lr_min": 0.0, "start_epoch": 0, "ra_magnitude": 9, "augmix_severity": 3,
             "model_ema_steps": 32, "model_ema_decay": 0.99998, "interpolation": "bilinear", "ra_reps": 3,
             "backend": "pil", "trainable": "all", "apex_verbosity": 2, "dist_url": "env://"}  # fmt: skip
#: The --dst options that hold a value of DSTSettings (flag dest -> field): filled from it by validate.
DST_ARGS = {"sparsity_level": "sparsity", "delta": "delta", "alpha": "alpha", "t_end": "t_end_fraction",
            "distribution": "distribution"}


def _flag(dest: str) -> str:
    return "--" + {"weight_decay": "wd", "permute": "apex-permutation"}.get(dest, dest.replace("_", "-"))


def _needs(args, dests: tuple[str, ...], ok: bool, why: str) -> None:
    """Refuse ``dests`` given explicitly when they would have no effect (``ok`` false)."""
    given = [d for d in dests if d in args.explicit]
    if given and not ok:
        raise SemisparseError(f"{', '.join(_flag(d) for d in given)} {why}")


#: Numeric flags and the closed range each must lie in (NaN and infinities are refused everywhere); a
#: bound that is a string is another flag's value. Bounds are generous: they catch typos and nonsense (1e30,
#: -1), not unusual recipes.
RANGES: dict[str, tuple[float, float]] = {
    "batch_size": (1, 2**16), "epochs": (1, 10**6), "accumulation_steps": (1, 2**16), "start_epoch": (0, 10**6),
    "lr": (0.0, 100.0), "momentum": (0.0, 1.0), "weight_decay": (0.0, 1.0), "norm_weight_decay": (0.0, 1.0),
    "bias_weight_decay": (0.0, 1.0), "transformer_embedding_decay": (0.0, 1.0), "label_smoothing": (0.0, 1.0),
    "mixup_alpha": (0.0, 1000.0), "cutmix_alpha": (0.0, 1000.0), "lr_warmup_epochs": (0, 10**6),
    "lr_warmup_decay": (0.0, 1.0), "lr_step_size": (1, 10**6), "lr_gamma": (0.0, 1.0), "lr_min": (0.0, 100.0),
    "print_freq": (0, 2**31), "ra_magnitude": (0, 30), "augmix_severity": (1, 10), "random_erase": (0.0, 1.0),
    "world_size": (1, 2**16), "model_ema_steps": (1, 2**31), "model_ema_decay": (0.0, 1.0),
    "val_resize_size": (1, 8192), "val_crop_size": (1, 8192), "train_crop_size": (1, 8192),
    "clip_grad_norm": (0.0, 1e6), "ra_reps": (1, 16), "seed": (0, 2**32 - 1), "mask_prior": (0.0, 1e4),
    "mask_shared_rows": (1, 2**16),
    "keep_last": (1, 10**6),
}  # fmt: skip
# (the --dst options are checked by DSTSettings, see dst_settings)
#: Bounds a value may not equal (a learning rate of 0 trains nothing; momentum 1 never forgets).
OPEN = {("lr", 0.0), ("momentum", 1.0), ("label_smoothing", 1.0), ("lr_warmup_decay", 0.0), ("lr_gamma", 0.0),
        ("model_ema_decay", 0.0), ("model_ema_decay", 1.0), ("clip_grad_norm", 0.0)}  # fmt: skip


def max_workers() -> int:
    """``-j`` bound: 4 loader processes per CPU (beyond that they only contend; each is a process)."""
    return max(4, 4 * (os.cpu_count() or 1))


def check_ranges(args: argparse.Namespace) -> None:
    """Refuse, in one line, a numeric flag that is NaN, infinite or outside :data:`RANGES`."""
    bounds = dict(RANGES, workers=(0, max_workers()))
    for dest, (lo, hi) in bounds.items():
        value = getattr(args, dest, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            flag = "-j/--workers" if dest == "workers" else _flag(dest)
            if not math.isfinite(v):
                raise SemisparseError(f"{flag} must be a finite number, got {v}")
            low = "(" if (dest, lo) in OPEN else "["
            high = ")" if (dest, hi) in OPEN else "]"
            if v < lo or v > hi or (dest, lo) in OPEN and v == lo or (dest, hi) in OPEN and v == hi:
                why = " (4 per CPU)" if dest == "workers" else ""
                raise SemisparseError(f"{flag} must be in {low}{lo:g}, {hi:g}{high}{why}, got {_short(repr(v), 40)}")
    if args.mask_tau is not None:
        for v in args.mask_tau:
            if not (math.isfinite(v) and 0.0 < v <= 1e4):
                raise SemisparseError(f"--mask-tau temperatures must be in (0, 1e4], got {_short(repr(v), 40)}")
    if args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        raise SemisparseError(f"unknown --device {_short(args.device, 40)!r}; expected cpu, cuda or cuda:N")


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
    check_ranges(args)
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
    n(args, ("keep_masks",), bool(args.weights), "needs --weights (the file whose masks it keeps or drops)")
    n(args, ("keep_last",), bool(args.output_dir) and not args.test_only, "needs --output-dir (it removes older "
      "model_N.pth files there)")
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
    n(args, ("apex_verbosity",), args.sparsity != "none" or args.dst is not None or bool(args.weights or args.resume),
      "needs --sparsity, --enable-apex, --dst or --weights of a masked file (it sets how much of the sparsity "
      "report is printed)")
    if args.ignore_linear and args.override_ignore_linear:
        raise SemisparseError("--ignore-linear and --override-ignore-linear contradict each other; drop one")
    masked = args.sparsity != "none" or args.dst is not None
    n(args, ("ignore_linear", "ignore_grouped", "aug_for_2x4", "override_ignore_linear"), masked,
      "needs --sparsity sparse_2x4|gumbel_2x4, --enable-apex or --dst")
    n(args, ("pattern",), args.sparsity != "none" or args.dst in ("srigl", "sr-ste"),
      "needs --sparsity sparse_2x4 (magnitude) or gumbel_2x4 (learned), or --dst srigl|sr-ste")
    n(args, ("permute",), args.sparsity != "none", "needs --sparsity sparse_2x4|gumbel_2x4 or --enable-apex")
    n(args, ("mask_tau", "mask_prior", "mask_prior_from", "mask_shared_rows"), args.sparsity == "gumbel_2x4",
      "needs --sparsity gumbel_2x4")
    refuse_masks(args.dst, args.sparsity)
    n(args, ("sparsity_level", "distribution", "dense_layers"), args.dst in ("rigl", "srigl", "static"),
      "needs --dst rigl, srigl or static")
    n(args, ("delta", "alpha", "t_end"), args.dst in ("rigl", "srigl"), "needs --dst rigl or srigl")
    n(args, ("ablation",), args.dst == "srigl", "needs --dst srigl")
    args.dst_settings = dst_settings(args)
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


def dst_settings(args: argparse.Namespace) -> DSTSettings | None:
    """``--dst`` and its options as :class:`DSTSettings` (None without ``--dst``): where each value is checked,
    once, and each default comes from; the options not given are then filled in ``args`` from it (what the
    checkpoint's ``args`` record)."""
    settings = None
    if args.dst is not None:
        settings = DSTSettings.from_flags(
            args.dst, sparsity_level=args.sparsity_level, delta=args.delta, alpha=args.alpha, t_end=args.t_end,
            distribution=args.distribution, ablation=args.ablation, seed=args.seed, dense_layers=args.dense_layers,
            pattern=(args.pattern or SRSTE_PATTERN) if args.dst == "sr-ste" else args.pattern if args.dst == "srigl"
            else None, ignore_linear=args.ignore_linear, ignore_grouped=args.ignore_grouped,
        )  # fmt: skip
    for dest, name in DST_ARGS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, getattr(settings or DSTSettings, name))
    return settings


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
    resumed_metrics: dict | None = None  # the resumed checkpoint's epoch record (metrics.jsonl's line)


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


def _model(args, data: DataSets) -> tuple[nn.Module, WeightsInfo]:
    """The run's model with ``--weights`` loaded; the masks of a semisparse file kept (see ``--keep-masks``)."""
    name = args.model or {"digits": "digits_cnn", "cifar10": "resnet18_cifar"}.get(data.kind, "resnet18")
    args.model = name
    kw = {"in_channels": 3} if name == "digits_cnn" and data.kind != "digits" else {}
    model = create_model(name, num_classes=data.num_classes, **kw)
    if data.kind == "digits" and name != "digits_cnn" and "model" in getattr(args, "from_checkpoint", ()):
        raise SemisparseError(f"checkpoint {args.resume} is of model {name!r}, but --data-path digits holds 8x8 "
                              "one-channel images (model digits_cnn)")  # fmt: skip
    if data.kind == "digits" and name != "digits_cnn":
        raise SemisparseError(f"--data-path digits holds 8x8 one-channel images; use --model digits_cnn, not {name}")
    try:  # the size it is validated at (one validation sample), recorded in checkpoints and files for ss.deploy
        model.semisparse_input_size = [int(v) for v in data.val[0][0].shape]
    except (IndexError, TypeError, AttributeError, OSError):
        pass
    info = WeightsInfo()
    if args.weights:
        info = _load_weights(args, model)
    elif args.resume and os.path.isfile(args.resume):
        ckpt_sparsity = _read_checkpoint(args.resume).get("sparsity") or {}
        if ckpt_sparsity.get("method") == "given":  # a fine-tune with given masks: put them back first
            info = load_run_weights(model, args.resume)
    return model, info


def _load_weights(args, model: nn.Module) -> WeightsInfo:
    masked = carries_masks(args.weights)
    if not masked:
        _needs(args, ("keep_masks",), False, f"needs --weights of a semisparse checkpoint or compressed file "
               f"({args.weights} carries no masks)")  # fmt: skip
        info = load_run_weights(model, args.weights)
        return info
    keep = args.keep_masks is not False
    if keep and args.sparsity == "gumbel_2x4":
        raise SemisparseError(f"--weights {args.weights} carries masks, which --sparsity gumbel_2x4 would replace by "
                              "newly learned ones: continue learning them with --resume of that run, fine-tune "
                              "with them fixed by dropping --sparsity, or learn new ones from its effective weights "
                              "with --no-keep-masks")  # fmt: skip
    if keep and args.dst in ("rigl", "srigl", "static"):
        raise SemisparseError(f"--dst {args.dst} draws its own initial masks and cannot start from the masks of "
                              f"--weights {args.weights}: drop --dst to fine-tune with them fixed, or add "
                              "--no-keep-masks to start from its effective weights (masked entries zero)")
    info = load_run_weights(model, args.weights, keep_masks=keep)
    want = args.pattern or "2:4"
    if keep and (args.sparsity == "sparse_2x4" or args.dst == "sr-ste") and info.pattern != want:
        flag = "--sparsity sparse_2x4" if args.sparsity == "sparse_2x4" else "--dst sr-ste"
        raise SemisparseError(f"--weights {args.weights} carries {info.pattern or 'non-N:M'} masks, not the {want} "
                              f"of {flag}: pass --pattern {info.pattern} to continue from them, or "
                              "--no-keep-masks to compute new masks from its effective weights")  # fmt: skip
    if keep and args.dst == "sr-ste":  # SR-STE starts from a dense model: the masked entries are zero in it
        from ..masking.parametrization import detach_all

        detach_all(model, bake=True)
    if dist_utils.is_main():
        if not keep:
            what = "its masks baked into the weights (masked entries zero), no mask kept"
        elif args.dst == "sr-ste":
            what = f"SR-STE continues from its {info.pattern} masks (masked entries zero)"
        else:
            what = f"{info.layers} masks ({info.pattern or 'per-layer structure'}) kept fixed"
        print(f"--weights {args.weights}: {what}", flush=True)
    return info


def _sparsity_config(args, given: WeightsInfo | None = None) -> SparsityConfig:
    method = {"none": "none", "sparse_2x4": "magnitude", "gumbel_2x4": "gumbel"}[args.sparsity]
    pattern = args.pattern or ("2:4" if method != "none" else None)
    if given is not None and given.masked and args.keep_masks is not False and args.dst is None:
        method, pattern = "given", given.pattern  # the masks of --weights (or of the resumed fine-tune), fixed
    return SparsityConfig(
        method=method, pattern=pattern,
        trainable="mask" if args.trainable == "gumbel_2x4" else "all",
        tau=tuple(args.mask_tau) if args.mask_tau else None, prior=args.mask_prior, permute=args.permute,
        prior_from=args.mask_prior_from, shared_rows=args.mask_shared_rows, pad=args.aug_for_2x4,
        layers=LayerSelection(ignore_linear=args.ignore_linear, ignore_grouped=args.ignore_grouped),
        dst=args.dst_settings,
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
        print(f"sparsity: {len(report.sparse_layers)} layers masked, {report.param_share:.1%} of prunable "
              f"weights{mac}, kept density {report.density:.3f}")  # fmt: skip
    if v >= 2:
        print(cli_words(str(report)))
    if v >= 3:
        print(f"sparsity settings: {sparsity.config}")


def _resume(run: Run, path: str) -> None:
    ckpt = _read_checkpoint(path)
    _read_checkpoint.cache = None  # read three times while setting up, not held during training
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
    check_resumable(ckpt, path, run.optimizer, run.lr_scheduler)  # before anything is loaded
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if run.lr_scheduler is not None and ckpt.get("lr_scheduler"):
            run.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise SemisparseError(f"checkpoint {path} does not fit this run: {str(exc).splitlines()[0]}") from exc
    if run.scaler is not None and ckpt.get("scaler"):
        with ckpt_entry(path, "scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None:
        if not ckpt.get("ema"):
            raise SemisparseError(f"checkpoint {path} has no EMA state; resume without --model-ema")
        with ckpt_entry(path, "ema"):
            run.ema.load_state_dict(ckpt["ema"])
    state = (ckpt.get("sparsity") or {}).get("state")
    if state:
        with ckpt_entry(path, "sparsity.state"):
            run.sparsity.load_state_dict(state)
    check_masks(run.model, path)  # a mask that breaks the declared pattern is refused before training
    if ckpt.get("rng"):
        with ckpt_entry(path, "rng"):
            set_rng_state(ckpt["rng"])
    run.start_epoch = int(ckpt["epoch"]) + 1
    run.resumed_metrics = ckpt.get("metrics")
    run.step = int(ckpt.get("step", 0))
    if dist_utils.is_main() and not run.args.test_only:
        print(f"resumed from {path}: epoch {ckpt['epoch']} done ({run.step} optimizer steps); continuing at "
              f"epoch {run.start_epoch} of {run.args.epochs}", flush=True)  # fmt: skip


def warn(message: str) -> None:
    """One ``semisparse: warning:`` line on stderr (main process only)."""
    if dist_utils.is_main():
        print(f"semisparse: warning: {message}", file=sys.stderr, flush=True)


def _schedule_notes(args, sparsity: TrainingSparsity, total_steps: int) -> None:
    """Say what a sparsity schedule will do, and warn when it does nothing (a silent no-op otherwise)."""
    if args.test_only:
        return
    if args.sparsity == "gumbel_2x4" and not (args.weights or args.resume):
        frozen = args.trainable == "gumbel_2x4"
        warn("--sparsity gumbel_2x4 without --weights learns masks over randomly initialised weights"
             + (" that stay frozen (--trainable gumbel_2x4): the model cannot learn; pass --weights FILE of a "
                "trained dense model" if frozen else " (trained jointly with them); the masking paper starts "
                "from trained dense weights: --weights FILE"))  # fmt: skip
    line = sparsity.schedule_line()
    if line and dist_utils.is_main():
        print(line, flush=True)
    if sparsity.scheduled_updates() == 0 and args.dst in ("rigl", "srigl"):
        warn(f"--dst {args.dst} never updates the topology: the first update is after --delta {args.delta} "
             f"optimizer steps, but updates stop at step {int(args.t_end * total_steps)} (--t-end {args.t_end:g} "
             f"of {total_steps} steps); lower --delta or train longer")


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
    model, given = _model(args, data)
    steps_per_epoch = math.ceil(len(train_loader) / args.accumulation_steps)
    total_steps = max(1, steps_per_epoch * args.epochs)
    model.to(device)
    sparsity = TrainingSparsity(_sparsity_config(args, given))
    example = next(iter(val_loader))[0][:1].to(device)
    report = sparsity.apply(model, total_steps, example_input=example, calibration=train_loader)
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args.opt, args.lr, args.momentum, args.weight_decay, args.norm_weight_decay,
                                args.bias_weight_decay, args.transformer_embedding_decay)  # fmt: skip
    sparsity.attach(model, optimizer, total_steps)
    _schedule_notes(args, sparsity, total_steps)
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
        else:
            print("note: TensorBoard is not installed, so no event files are written (pip install tensorboard); "
                  "metrics.jsonl holds every number", flush=True)  # fmt: skip
    if args.use_wandb and dist_utils.is_main():
        cfg = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}
        loggers.append(wandb_logger(args.wandb_project, args.wandb_log_dir, cfg))
    return loggers


def _keeping_last(save, output_dir: str, keep: int):
    """``save`` that then removes the ``model_N.pth`` files older than the newest ``keep`` (``--keep-last``)."""

    def save_and_prune(ckpt, epoch: int) -> None:
        save(ckpt, epoch)
        for old in range(epoch - keep, -1, -1):
            path = os.path.join(output_dir, f"model_{old}.pth")
            if not os.path.exists(path):
                break  # removed by an earlier epoch (or a resumed run's earlier part)
            os.remove(path)

    return save_and_prune


def _banner(run: Run) -> None:
    """What the run is, before its first iteration (as torchvision's and timm's logs start)."""
    if not dist_utils.is_main():
        return
    args = run.args
    given = " ".join(f"{_flag(k)} {_show(getattr(args, k))}" for k in sorted(args.explicit) if hasattr(args, k))
    params = sum(p.numel() for p in run.model.parameters())
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    data = run.data
    steps = len(run.train_loader)
    world = run.dist.world_size
    print(f"semisparse train: {args.model} ({params:,} parameters, {trainable:,} trainable) on {run.device}"
          f"{f' x {world} processes' if world > 1 else ''}; data {args.data_path} ({data.kind}): "
          f"{len(data.train):,} train / {len(data.val):,} val images, {data.num_classes} classes; batch "
          f"{args.batch_size}{f' x {world}' if world > 1 else ''}, {steps} iterations per epoch, epochs "
          f"{run.start_epoch}..{args.epochs - 1}", flush=True)  # fmt: skip
    print(f"options: {given or '(all defaults)'}", flush=True)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _summary(args, history: list[dict], seconds: float) -> None:
    """The end of a run: best top-1 and its epoch, total time, where the files are."""
    if not dist_utils.is_main() or not history:
        return
    best = max(history, key=lambda r: r["val_acc1"])
    last = history[-1]
    line = (f"done: {len(history)} epoch{'s' if len(history) != 1 else ''} in {_duration(seconds)}; best val_acc1 "
            f"{best['val_acc1']:.2f} (epoch {best['epoch']}), last {last['val_acc1']:.2f}")  # fmt: skip
    if args.output_dir:
        line += (f"; checkpoint {os.path.join(args.output_dir, 'checkpoint.pth')}, metrics "
                 f"{os.path.join(args.output_dir, 'metrics.jsonl')}")  # fmt: skip
    print(line, flush=True)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def writable_dir(path: str) -> None:
    """An existing ``--output-dir`` that cannot take a file is refused at start-up, not at the first save."""
    if not os.path.isdir(path):
        return
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise SemisparseError(f"--output-dir {path} is not writable ({exc.strerror or exc}); choose another folder "
                              "or fix its permissions") from None


#: What ``args`` holds beside the options: which were given, and the DST settings built from them.
_NOT_OPTIONS = ("explicit", "from_checkpoint", "dst_settings")


def plain_args(args: argparse.Namespace) -> dict:
    """The options as a plain dict (what a checkpoint stores)."""
    out = {}
    for k, v in vars(args).items():
        if k in _NOT_OPTIONS:
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
    if args.output_dir and not args.test_only:
        writable_dir(args.output_dir)  # before any work: another run's folder is refused at once
        folder = claim_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite,
                                  clean=os.environ.get("RANK", "0") == "0")  # fmt: skip
    started = time.perf_counter()
    history: list[dict] = []
    try:
        run = setup(args)
        if args.test_only:
            return _test_only(run)
        _banner(run)
        loggers = _loggers(args)
        if args.output_dir and dist_utils.is_main():
            log = MetricsLog(args.output_dir)
            same = args.resume and same_dir(os.path.dirname(os.path.abspath(args.resume)), args.output_dir)
            log.start(run.start_epoch, restore=run.resumed_metrics if same else None)
            loggers.insert(0, log)
        elif dist_utils.is_main():
            print("no --output-dir: no checkpoint or metrics file is written", flush=True)
        if run.start_epoch >= args.epochs and dist_utils.is_main():
            print(f"nothing to train: start epoch {run.start_epoch} >= --epochs {args.epochs}")
        save = folder.save if folder is not None else None
        if save is not None and args.keep_last:
            save = _keeping_last(folder.save, args.output_dir, args.keep_last)
        steps = StepOptions(amp_dtype=run.amp_dtype, scaler=run.scaler, accumulation_steps=args.accumulation_steps,
                            clip_grad_norm=args.clip_grad_norm, channels_last=args.channels_last,
                            batch_transform=run.batch_transform, ema=run.ema, ema_steps=args.model_ema_steps)
        output = RunOutput(output_dir=args.output_dir, args=plain_args(args), loggers=loggers,
                           print_freq=args.print_freq, save_checkpoint=save)
        history = fit(
            run.train_model, run.train_loader, run.val_loader, run.optimizer, run.lr_scheduler, args.epochs,
            sparsity=run.sparsity, criterion=run.criterion, device=run.device, start_epoch=run.start_epoch,
            step=run.step, seed=args.seed, rank=run.dist.rank, ema_warmup_epochs=args.lr_warmup_epochs,
            steps=steps, output=output,
        )  # fmt: skip
        _report_skipped(run)
        _summary(args, history, time.perf_counter() - started)
    except KeyboardInterrupt:
        ckpt = os.path.join(args.output_dir, "checkpoint.pth") if args.output_dir else None
        if ckpt and os.path.isfile(ckpt) and not args.test_only and dist_utils.is_main():
            print(f"semisparse: interrupted; continue with: semisparse train --resume {ckpt} --output-dir "
                  f"{args.output_dir}", file=sys.stderr, flush=True)  # fmt: skip
        raise
    except SemisparseError as exc:
        said = cli_words(str(exc))
        if said != str(exc):
            raise SemisparseError(said) from exc
        raise
    except Exception as exc:
        if args.compile and type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SemisparseError(f"--compile: torch.compile cannot compile this model and sparsity mode as one graph "
                                  f"({first}); drop --compile") from exc  # fmt: skip
        raise
    finally:
        dist_utils.cleanup()
        if folder is not None:
            folder.release()  # the next run may write into the folder
    return 0


#: The library's keyword spellings in messages and reports -> the flags a CLI user types.
_CLI_WORDS = (("pad=True", "--aug-for-2x4"), ("trainable='mask'", "--trainable gumbel_2x4"),
              ("trainable=mask", "--trainable gumbel_2x4"), ("trainable='all'", "--trainable all"),
              ("trainable=all", "--trainable all"), ("ignore_linear=True", "--ignore-linear"),
              ("ignore_grouped=True", "--ignore-grouped"), ("permute=True", "--apex-permutation"))  # fmt: skip


def cli_words(text: str) -> str:
    """``text`` with the library's keyword arguments named as ``semisparse train`` flags."""
    for word, flag in _CLI_WORDS:
        text = text.replace(word, flag)
    return text


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
