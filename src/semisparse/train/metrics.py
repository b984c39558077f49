"""Where a run's numbers go: ``metrics.jsonl``, the terminal (tqdm or plain lines), TensorBoard, W&B.

``metrics.jsonl`` holds one JSON object per epoch (``epoch`` 0-based as torchvision, ``lr``,
``train_loss``, ``val_loss``, ``val_acc1``/``val_acc5`` in percent, ``sparsity``, ``epoch_seconds``,
``ema_val_acc1`` with EMA...). A resumed run drops the lines of the epochs it redoes, then appends; the
lines are dropped when its first record arrives (after its first checkpoint), so a run that fails or is
killed before that leaves the history as it was.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator

from ..errors import SemisparseError
from ..io.files import atomic_write

Logger = Callable[[dict], None]


class MetricsLog:
    """Append-only ``<output_dir>/metrics.jsonl`` that never holds an epoch twice."""

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._keep_before: int | None = None

    def start(self, start_epoch: int) -> None:
        """Keep the lines of epochs before ``start_epoch`` only. Nothing changes until the first record
        arrives: then the kept lines and that record replace the file in one atomic rename."""
        self._keep_before = int(start_epoch)

    def __call__(self, record: dict) -> None:
        line = json.dumps({k: _plain(v) for k, v in record.items()}) + "\n"
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if self._keep_before is None:
            with open(self.path, "a") as f:
                f.write(line)
            return
        keep = []
        if os.path.exists(self.path):
            keep = [r for r in read_metrics(self.path) if r.get("epoch", -1) < self._keep_before]

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
                f.write(line)

        atomic_write(self.path, write)
        self._keep_before = None


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` (its folder may be given instead)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tensorboard_logger(output_dir: str) -> Logger | None:
    """A logger writing every numeric metric to TensorBoard under ``<output_dir>/tensorboard``; None
    when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(record: dict) -> None:
        for k, v in record.items():
            if k != "epoch" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, record["epoch"])
        writer.flush()

    return log


def wandb_logger(project: str | None, log_dir: str | None, config: dict) -> Logger:
    """A logger sending each epoch's record to Weights & Biases; a clear error when wandb is missing."""
    try:
        import wandb
    except ImportError as exc:
        raise SemisparseError(
            "--use-wandb needs wandb (pip install wandb); without it drop --use-wandb: every metric is "
            "also in <output-dir>/metrics.jsonl (and TensorBoard when installed)"
        ) from exc
    run = wandb.init(project=project or "semisparse", dir=log_dir, config=config)

    def log(record: dict) -> None:
        run.log({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])

    return log


def progress(iterable: Iterable, total: int, desc: str, print_freq: int, enabled: bool,
             status: Callable[[], str]) -> Iterator:  # fmt: skip
    """tqdm on a terminal, a plain line every ``print_freq`` iterations otherwise, nothing if disabled."""
    if not enabled:
        yield from iterable
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
        for i, item in enumerate(bar):
            yield item
            if i % max(1, print_freq) == 0:
                bar.set_postfix_str(status())
        return
    for i, item in enumerate(iterable):
        yield item
        if print_freq > 0 and (i % print_freq == 0 or i == total - 1):
            print(f"{desc} [{i + 1}/{total}] {status()}", flush=True)
