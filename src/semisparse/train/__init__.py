"""Training engine: data, optimizers, the loop, checkpoints, sparsity wiring. Used by ``semisparse train``
and ``semisparse demo``.

A run in plain Python (what the CLI does, minus flags)::

    from semisparse.models import create_model
    from semisparse.train import (SparsityConfig, TrainingSparsity, build_lr_scheduler, build_optimizer,
                                  fit, load_data, make_loaders)

    data = load_data("digits")                                   # or an ImageFolder / CIFAR-10 folder
    train_loader, val_loader = make_loaders(data, batch_size=32)
    model = create_model("digits_cnn", num_classes=data.num_classes)
    sparsity = TrainingSparsity(SparsityConfig(method="magnitude", pattern="2:4"))
    sparsity.apply(model, total_steps=epochs * len(train_loader))   # before the optimizer
    optimizer = build_optimizer(model, "sgd", lr=0.05, weight_decay=1e-4)
    sparsity.attach(model, optimizer, total_steps=...)              # DST only; a no-op otherwise
    scheduler = build_lr_scheduler(optimizer, "cosineannealinglr", epochs=epochs)
    history = fit(model, train_loader, val_loader, optimizer, scheduler, epochs, sparsity=sparsity,
                  output_dir="runs/x")                              # -> [{"epoch", "val_acc1", ...}, ...]
    evaluate(model, nn.CrossEntropyLoss(), val_loader)              # {"loss", "acc1", "acc5", "count"}

``fit`` keyword options: ``device, criterion, start_epoch, step, seed, rank, ema_warmup_epochs``, and two
groups: ``steps=StepOptions(amp_dtype, scaler, accumulation_steps, clip_grad_norm, channels_last,
batch_transform, ema (EMA(model, decay)), ema_steps)`` and ``output=RunOutput(output_dir, args, loggers,
print_freq, show_progress, save_checkpoint)``; their fields are also accepted as keywords.

Sparse training's settings are one :class:`~semisparse.dst.DSTSettings`
(``SparsityConfig(dst=DSTSettings("srigl", sparsity=0.9, t_end_fraction=0.75))``).
"""

from .checkpoint import atomic_save, load_checkpoint
from .data import AugmentOptions, DataSets, load_data
from .distributed import ShardSampler
from .engine import EMA, RunOutput, StepOptions, evaluate, fit, train_one_epoch, unwrap
from .loaders import make_loaders
from .metrics import MetricsLog, read_metrics
from .optim import build_lr_scheduler, build_optimizer
from .sparsity import SparsityConfig, TrainingSparsity, zero_share

__all__ = [
    "AugmentOptions",
    "DataSets",
    "EMA",
    "MetricsLog",
    "RunOutput",
    "ShardSampler",
    "SparsityConfig",
    "StepOptions",
    "TrainingSparsity",
    "atomic_save",
    "build_lr_scheduler",
    "build_optimizer",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_data",
    "make_loaders",
    "read_metrics",
    "train_one_epoch",
    "unwrap",
    "zero_share",
]
