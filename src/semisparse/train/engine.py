"""The training loop shared by ``semisparse train`` and ``semisparse demo``: plain functions.

``train_one_epoch`` runs one pass with AMP (bf16 on CPU, fp16 + GradScaler or bf16 on CUDA), gradient
accumulation, clipping, channels-last, EMA and the sparsity hook after every optimizer step;
``evaluate`` gives loss and top-1/top-5 (percent), summed over DDP ranks; ``fit`` runs epochs, steps the
per-epoch lr schedule, evaluates (and the EMA model), logs one record per epoch and writes a checkpoint
every epoch. Each epoch reseeds every RNG from ``(seed, epoch, rank)``, so a resumed run repeats the
uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from ..io.digest import seal
from .checkpoint import atomic_save, rng_state
from .distributed import all_reduce_sum, is_main
from .metrics import Logger, plain_record, progress
from .sparsity import TrainingSparsity, zero_share


class EMA(nn.Module):
    """Exponential moving average of a model's floating-point parameters and buffers.

    Integer and bool tensors (BatchNorm counters, sparsity masks) are copied, so the average follows
    the current masks. ``ema.module`` is the averaged model; ``n_averaged`` counts updates.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(unwrap(model))
        self.module.requires_grad_(False)
        self.decay = float(decay)
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        source = unwrap(model).state_dict()
        for key, avg in self.module.state_dict().items():
            new = source[key].to(avg.device)
            if avg.dtype.is_floating_point and int(self.n_averaged) > 0:
                avg.lerp_(new.to(avg.dtype), 1.0 - self.decay)
            else:
                avg.copy_(new)
        self.n_averaged += 1


@dataclass
class StepOptions:
    """How each optimizer step is taken (``fit`` and ``train_one_epoch``): AMP (``amp_dtype``, fp16's
    ``scaler``), ``accumulation_steps`` batches per step, gradient clipping, channels-last inputs, a
    ``batch_transform(x, y)`` (mixup, cutmix) and an ``ema`` updated every ``ema_steps`` optimizer steps."""

    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    accumulation_steps: int = 1
    clip_grad_norm: float | None = None
    channels_last: bool = False
    batch_transform: Callable | None = None
    ema: EMA | None = None
    ema_steps: int = 1


@dataclass
class RunOutput:
    """What ``fit`` writes and prints: checkpoints in ``output_dir`` (or through ``save_checkpoint(ckpt,
    epoch)``) recording ``args``, one record per epoch to ``loggers``, progress every ``print_freq`` batches."""

    output_dir: str | None = None
    args: Mapping | None = None
    loggers: Sequence[Logger] = ()
    print_freq: int = 10
    show_progress: bool = True
    save_checkpoint: Callable[[dict, int], None] | None = None


def _grouped(what: str, flat: dict, *groups: tuple[type, object]) -> list:
    """Each group object (a new one when None) with the flat keywords that are its fields put in; a keyword
    that is no field of any group is the TypeError Python gives for an unknown keyword."""
    out = []
    for cls, given in groups:
        names = {f.name for f in fields(cls)}
        mine = {k: flat.pop(k) for k in list(flat) if k in names}
        out.append(replace(given or cls(), **mine))
    if flat:
        raise TypeError(f"{what}() got an unexpected keyword argument {next(iter(flat))!r}")
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or ``torch.compile`` wrappers (what checkpoints store)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _eval_model(model: nn.Module) -> nn.Module:
    """The model minus DDP (evaluation shards may differ in length across ranks; no collectives)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Reseed torch, numpy and random from ``(seed, epoch, rank)``: epochs are reproducible on their own."""
    s = (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**31)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def _to(x, device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    device: torch.device | str = "cpu",
    epoch: int = 0,
    *,
    step: int = 0,
    sparsity: TrainingSparsity | None = None,
    ema_warmup: bool = False,
    options: StepOptions | None = None,
    print_freq: int = 10,
    show_progress: bool = True,
    **flat: object,
) -> dict:
    """One epoch; returns ``{"train_loss", "train_acc1", "step"}`` (``step``: optimizer steps so far).

    The optimizer steps every ``accumulation_steps`` batches (and at the end of the epoch), with the loss
    of each batch divided by the size of its accumulation group. ``batch_transform(x, y)`` (mixup,
    cutmix) runs on each batch after it reaches the device. ``options``: :class:`StepOptions`, whose fields
    may also be given as keywords (``amp_dtype=...``).
    """
    (o,) = _grouped("train_one_epoch", flat, (StepOptions, options))
    amp_dtype, scaler, channels_last, ema = o.amp_dtype, o.scaler, o.channels_last, o.ema
    device = torch.device(device)
    model.train()
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    n = len(loader)
    acc = max(1, int(o.accumulation_steps))
    # sums stay on the device: no host sync per batch (the progress line syncs only when it prints)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
    last = {"loss": torch.tensor(float("nan"))}

    clock = {"start": time.perf_counter(), "data": 0.0, "done": 0, "images": 0}
    clock["mark"] = clock["start"]

    def status() -> str:
        """Loss, lr, time per iteration (and the part spent waiting for data), images/s and the epoch's ETA."""
        text = f"loss {float(last['loss']):.4f} lr {optimizer.param_groups[0]['lr']:.4g}"
        done = clock["done"]
        if done:
            elapsed = time.perf_counter() - clock["start"]
            per_iter = elapsed / done
            text += (f" time {per_iter:.3f}s data {clock['data'] / done:.3f}s "
                     f"{clock['images'] / max(elapsed, 1e-9):.0f} img/s eta {_clock(per_iter * (n - done))}")
        return text

    optimizer.zero_grad(set_to_none=True)
    it = progress(loader, n, f"Epoch [{epoch}]", print_freq, show_progress and is_main(), status)
    # under fp16 the GradScaler skips optimizer.step() when gradients overflowed: a post-step hook tells
    # (no device read); a skipped step is not counted, and the sparsity schedule does not see it either
    stepped = [False]
    handle = optimizer.register_step_post_hook(lambda *_: stepped.__setitem__(0, True))
    try:
        for i, (x, y) in enumerate(it):
            clock["data"] += time.perf_counter() - clock["mark"]
            x, y = _to(x, device, channels_last), y.to(device, non_blocking=True)
            hard = y
            if o.batch_transform is not None:
                x, y = o.batch_transform(x, y)
            group_start = (i // acc) * acc
            group = min(acc, n - group_start)
            stepping = i - group_start == group - 1
            sync = contextlib.nullcontext() if (stepping or not ddp) else model.no_sync()
            with sync:
                with _autocast(device, amp_dtype):
                    out = model(x)
                    loss = criterion(out, y)
                scaled = loss / group
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            if stepping:
                if o.clip_grad_norm is not None:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(params, o.clip_grad_norm)
                stepped[0] = False
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not stepped[0]:  # skipped by the GradScaler (inf/NaN gradients): not a step of the schedule
                    if sparsity is not None:
                        sparsity.after_skipped_step()
                else:
                    step += 1
                    if sparsity is not None:
                        sparsity.after_optimizer_step(step)
                    if ema is not None and step % max(1, o.ema_steps) == 0:
                        ema.update(model)
                        if ema_warmup:
                            ema.n_averaged.fill_(0)  # during lr warm-up the average restarts (torchvision)
            bs = x.shape[0]
            last["loss"] = loss.detach()
            sums[0] += loss.detach().double() * bs
            sums[2] += bs
            if hard.dim() == 1:
                sums[1] += (out.detach().argmax(1) == hard).sum()
            clock["done"] += 1
            clock["images"] += bs
            clock["mark"] = time.perf_counter()
    finally:
        handle.remove()
    totals = all_reduce_sum(sums).cpu()
    return {
        "train_loss": float(totals[0] / totals[2].clamp(min=1)),
        "train_acc1": float(100.0 * totals[1] / totals[2].clamp(min=1)),
        "step": step,
    }


def _clock(seconds: float) -> str:
    """``h:mm:ss``, as torchvision's and timm's logs print ETAs."""
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict:
    """``{"loss", "acc1", "acc5", "count"}`` over ``loader`` (summed over DDP ranks; accuracies in %)."""
    device = torch.device(device)
    model = _eval_model(model)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, correct1, correct5, n (NCCL: on device)
    for x, y in loader:
        x, y = _to(x, device, channels_last), y.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            out = model(x)
            loss = criterion(out, y)
        k = min(5, out.shape[1])
        top = out.float().topk(k, dim=1).indices
        hit = top == y[:, None]
        sums += torch.stack([loss.double() * len(y), hit[:, 0].sum().double(), hit.any(1).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=device)])  # fmt: skip
    model.train(was_training)
    sums = all_reduce_sum(sums).cpu()
    n = max(1.0, float(sums[3]))
    return {"loss": float(sums[0]) / n, "acc1": 100.0 * float(sums[1]) / n, "acc5": 100.0 * float(sums[2]) / n,
            "count": int(sums[3])}  # fmt: skip


def checkpoint_dict(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    epoch: int,
    step: int,
    *,
    args: Mapping | None = None,
    sparsity: TrainingSparsity | None = None,
    scaler=None,
    ema: EMA | None = None,
) -> dict:
    """Everything a resume needs, as plain dicts and tensors (see :mod:`semisparse.train.checkpoint`)."""
    base = unwrap(model)
    sp = sparsity or TrainingSparsity()
    return {
        "model": base.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "args": dict(args or {}),
        "arch": dict(getattr(base, "semisparse_arch", {}) or {}),
        "input_size": getattr(base, "semisparse_input_size", None),  # (C, H, W) it is trained / validated at
        "sparsity": sp.checkpoint_entry(base),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "rng": rng_state(),
    }


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    epochs: int,
    *,
    sparsity: TrainingSparsity | None = None,
    criterion: nn.Module | None = None,
    device: torch.device | str = "cpu",
    start_epoch: int = 0,
    step: int = 0,
    seed: int = 0,
    rank: int = 0,
    ema_warmup_epochs: int = 0,
    steps: StepOptions | None = None,
    output: RunOutput | None = None,
    **flat: object,
) -> list[dict]:
    """Train epochs ``start_epoch .. epochs-1``; returns one record per epoch (also sent to ``loggers``).

    ``model`` may be wrapped in DDP and/or ``torch.compile``; checkpoints store the plain model. With
    ``output_dir`` (rank 0 only) every epoch writes ``model_{epoch}.pth`` and ``checkpoint.pth``
    atomically, then sends its record to ``loggers``; ``save_checkpoint(ckpt, epoch)``, when given, writes
    instead (the CLI's :class:`~semisparse.train.run_folder.RunFolder`, which replaces another run's files
    only after the first new checkpoint). ``lr_scheduler`` steps once per epoch. Records: ``epoch, lr,
    train_loss, train_acc1, val_loss, val_acc1, val_acc5, sparsity, epoch_seconds, step`` and
    ``ema_val_loss/acc1/acc5`` with EMA.

    ``steps``: how each optimizer step is taken (:class:`StepOptions`); ``output``: what is written and
    printed (:class:`RunOutput`). Their fields may also be given as keywords (``output_dir=...``).
    """
    steps, output = _grouped("fit", flat, (StepOptions, steps), (RunOutput, output))
    ema, amp_dtype, channels_last, scaler = steps.ema, steps.amp_dtype, steps.channels_last, steps.scaler
    output_dir, loggers, show_progress = output.output_dir, output.loggers, output.show_progress
    device = torch.device(device)
    criterion = criterion or nn.CrossEntropyLoss()
    base = unwrap(model)
    history = []
    for epoch in range(start_epoch, epochs):
        seed_epoch(seed, epoch, rank)
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        tr = train_one_epoch(
            model, criterion, optimizer, train_loader, device, epoch, step=step, sparsity=sparsity,
            ema_warmup=epoch < ema_warmup_epochs, options=steps, print_freq=output.print_freq,
            show_progress=show_progress,
        )  # fmt: skip
        step = tr["step"]
        if lr_scheduler is not None:
            lr_scheduler.step()
        val = evaluate(model, criterion, val_loader, device, amp_dtype=amp_dtype, channels_last=channels_last)
        record = {
            "epoch": epoch, "lr": lr, "train_loss": tr["train_loss"], "train_acc1": tr["train_acc1"],
            "val_loss": val["loss"], "val_acc1": val["acc1"], "val_acc5": val["acc5"],
            "sparsity": zero_share(base), "step": step,
        }  # fmt: skip
        if sparsity is not None:
            record.update(sparsity.epoch_stats())  # DST: topology updates and ablated neurons of the epoch
        if ema is not None:
            ev = evaluate(ema.module, criterion, val_loader, device, amp_dtype=amp_dtype, channels_last=channels_last)
            record.update(ema_val_loss=ev["loss"], ema_val_acc1=ev["acc1"], ema_val_acc5=ev["acc5"])
        record["epoch_seconds"] = time.perf_counter() - t0
        if output_dir and is_main():
            ckpt = checkpoint_dict(model, optimizer, lr_scheduler, epoch, step, args=output.args, sparsity=sparsity,
                                   scaler=scaler, ema=ema)  # fmt: skip
            ckpt["metrics"] = plain_record(record)  # restores the metrics line if a kill comes before it
            if output.save_checkpoint is not None:
                output.save_checkpoint(ckpt, epoch)
            else:
                ckpt = seal(ckpt)  # one digest for both files
                atomic_save(ckpt, os.path.join(output_dir, f"model_{epoch}.pth"))
                atomic_save(ckpt, os.path.join(output_dir, "checkpoint.pth"))
        if is_main():
            for log in loggers:
                log(record)
            if show_progress:
                extra = f" ema_acc1 {record['ema_val_acc1']:.2f}" if ema is not None else ""
                print(
                    f"epoch {epoch}: train_loss {record['train_loss']:.4f} val_loss {record['val_loss']:.4f} "
                    f"val_acc1 {record['val_acc1']:.2f} val_acc5 {record['val_acc5']:.2f}{extra} "
                    f"sparsity {record['sparsity']:.3f} ({record['epoch_seconds']:.1f}s)",
                    flush=True,
                )
        history.append(record)
    return history
