"""Where a run's numbers go: ``metrics.jsonl``, the terminal (tqdm or plain lines), TensorBoard, W&B.

``metrics.jsonl`` holds one JSON object per epoch (``epoch`` 0-based as torchvision, ``lr``,
``train_loss``, ``val_loss``, ``val_acc1``/``val_acc5`` in percent, ``sparsity``, ``epoch_seconds``,
``ema_val_acc1`` with EMA...). A resumed run drops the lines of the epochs it redoes, then appends; the
lines are dropped when its first record arrives (after its first checkpoint), so a run that fails or is
killed before that leaves the history as it was. Each checkpoint also holds its epoch's record, so a kill
at any moment loses no line: see :class:`MetricsLog`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

from ..errors import SemisparseError
from ..io.files import atomic_write

Logger = Callable[[dict], None]


class MetricsLog:
    """Append-only ``<output_dir>/metrics.jsonl`` that never holds an epoch twice, and loses none.

    Each epoch's record is also stored in its checkpoint (``"metrics"``, see :func:`plain_record`): a run
    killed between the checkpoint's rename and the line's append gets the line back on ``--resume``
    (:meth:`start`'s ``restore``). A line is appended with one ``write`` and flushed to disk; a last line
    left incomplete (a kill or a full disk mid-append) is dropped on resume with a one-line note, and the
    checkpoint's record restores it when it was the resumed epoch's.
    """

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._keep_before: int | None = None

    def start(self, start_epoch: int, restore: Mapping | None = None) -> None:
        """Keep the lines of epochs before ``start_epoch`` only. The file is repaired now when it needs it
        (a damaged last line dropped; ``restore``, the resumed checkpoint's record, written back when its
        epoch's line is missing); otherwise nothing changes until the first record arrives: then the kept
        lines and that record replace the file in one atomic rename."""
        self._keep_before = int(start_epoch)
        records, damaged = _read_records(self.path) if os.path.exists(self.path) else ([], None)
        if damaged:
            print(f"semisparse: note: {damaged}; dropped it", file=sys.stderr, flush=True)
        try:
            restore = json.loads(json.dumps(plain_record(restore))) if isinstance(restore, Mapping) else None
        except (TypeError, ValueError, RecursionError):  # not a record this class wrote: nothing to restore
            restore = None
        missing = (
            isinstance(restore, Mapping)
            and _is_int(restore.get("epoch"))
            and restore["epoch"] < start_epoch
            and all(r.get("epoch") != restore["epoch"] for r in records)
        )
        if missing:
            print(f"semisparse: note: {self.path} lacked epoch {restore['epoch']}'s line (the run stopped before "
                  "writing it); restored it from the checkpoint", file=sys.stderr, flush=True)  # fmt: skip
            records = sorted([*records, dict(restore)], key=lambda r: r.get("epoch", -1))
        if damaged or missing:
            self._rewrite([r for r in records if r.get("epoch", -1) < start_epoch])

    def _rewrite(self, keep: list[dict], line: str = "") -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
                f.write(line)

        atomic_write(self.path, write)

    def __call__(self, record: dict) -> None:
        line = json.dumps(plain_record(record)) + "\n"
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if self._keep_before is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                os.write(fd, line.encode())  # one write: a line is all there or (after a kill) a damaged tail
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        keep = []
        if os.path.exists(self.path):
            keep = [r for r in _read_records(self.path)[0] if r.get("epoch", -1) < self._keep_before]
        self._rewrite(keep, line)
        self._keep_before = None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def plain_record(record: Mapping) -> dict:
    """An epoch's record as ``metrics.jsonl`` holds it (non-finite floats as strings): JSON, and what a
    checkpoint stores under ``"metrics"``."""
    return {str(k): _plain(v) for k, v in record.items()}


def _read_records(path: str) -> tuple[list[dict], str | None]:
    """The records of a ``metrics.jsonl``, and what was wrong with its last line (dropped) or None.

    A damaged line before the last is not a kill's trace: it is refused in one line naming the file and line.
    """
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    complete = lines[-1] == b""  # the file ends with a newline: the last line was written whole
    records, damaged = [], None
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    for k, (no, raw) in enumerate(numbered):
        last = k == len(numbered) - 1
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            if last:
                damaged = f"{path}: its last line (line {no}) is damaged ({_first_line(exc)})"
                break
            raise SemisparseError(
                f"{path}: line {no} is not a JSON record ({_first_line(exc)}); repair or remove that line"
            ) from None
        if last and not complete:
            damaged = f"{path}: its last line (line {no}) is incomplete (no newline)"
            break
        records.append(rec)
    return records, damaged


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` (its folder may be given instead).

    A damaged last line (a run killed mid-append) is left out with a warning; a damaged line before it is a
    :class:`~semisparse.SemisparseError` naming the file and the line.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    records, damaged = _read_records(path)
    if damaged:
        warnings.warn(f"{damaged}; it is left out", UserWarning, stacklevel=2)
    return records


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
