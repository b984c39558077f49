"""``semisparse eval FILE --data-path DIR``: top-1 / top-5 and loss of a trained model on a validation set.

``FILE`` is a training checkpoint (``checkpoint.pth`` / ``model_N.pth``; learned masks count as their
argmax, as ``export`` writes them) or a compressed file (``semisparse export`` / ``ss.save``). The model is
the one the file records (``--model`` for a file that records none); the masks are kept exactly. It runs
``semisparse train --test-only --weights FILE`` and prints its ``test: val_loss ... val_acc1 ... val_acc5``
line; the validation transform flags a training checkpoint recorded (crop and resize sizes, interpolation)
are used unless given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import SemisparseError
from ..io.compressed import read_header
from ..io.files import check_file, is_safetensors, load_torch
from .args import OneLineParser
from .train import HelpFormatter
from .train import main as train_main

#: Flags passed on to ``semisparse train`` (eval's dest -> train's flag), and those a checkpoint may fill.
PASSED = {"data_path": "--data-path", "model": "--model", "batch_size": "-b", "workers": "-j", "device": "--device",
          "val_resize_size": "--val-resize-size", "val_crop_size": "--val-crop-size",
          "interpolation": "--interpolation"}  # fmt: skip
FROM_CHECKPOINT = ("val_resize_size", "val_crop_size", "interpolation")


def get_args_parser() -> OneLineParser:
    p = OneLineParser(prog="semisparse eval", formatter_class=HelpFormatter,
                      description="Top-1/top-5 accuracy and loss of a training checkpoint or compressed file.")
    p.add_argument("file", help="training checkpoint (.pth) or compressed file (.safetensors)")
    p.add_argument("--data-path", default=None, help="validation data as for `semisparse train` (default: the "
                   "checkpoint's --data-path, else digits)")
    p.add_argument("--model", default=None, help="model name, for a file that records no architecture")
    p.add_argument("-b", "--batch-size", default=None, type=int, help="images per batch (default: 32)")
    p.add_argument("-j", "--workers", default=None, type=int, help="data loading workers (default: as train)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="evaluate under autocast (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory layout")
    p.add_argument("--val-resize-size", default=None, type=int, help="ImageFolder resize (default: the checkpoint's)")
    p.add_argument("--val-crop-size", default=None, type=int, help="ImageFolder centre crop (default: the "
                   "checkpoint's)")
    p.add_argument("--interpolation", default=None, help="resize interpolation (default: the checkpoint's)")
    return p


def recorded(path: str) -> tuple[str | None, dict]:
    """The model name ``path`` records and, for a training checkpoint, its run's options."""
    check_file(Path(path), "file")
    if is_safetensors(path):
        arch = read_header(path).get("arch")
        return (arch.get("name") if isinstance(arch, Mapping) else None), {}
    obj = load_torch(path, "checkpoint")
    if not isinstance(obj, Mapping):
        raise SemisparseError(f"{path} is not a training checkpoint or a compressed file")
    arch = obj.get("arch")
    args = obj.get("args")
    name = arch.get("name") if isinstance(arch, Mapping) else None
    return (name if isinstance(name, str) else None), (dict(args) if isinstance(args, Mapping) else {})


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    name, saved = recorded(args.file)
    values = vars(args)
    values["model"] = args.model or name
    if args.data_path is None:
        values["data_path"] = saved.get("data_path") if isinstance(saved.get("data_path"), str) else "digits"
    same_data = values["data_path"] == saved.get("data_path")
    for key in FROM_CHECKPOINT:  # the checkpoint's validation transform (set only when it was given)
        value = saved.get(key)
        if values[key] is None and same_data and isinstance(value, (int, str)) and value != "bilinear":
            values[key] = value
    tokens = ["--test-only", "--weights", os.fspath(args.file)]
    for dest, flag in PASSED.items():
        if values.get(dest) is not None:
            tokens += [flag, str(values[dest])]
    tokens += ["--amp"] * args.amp + ["--channels-last"] * args.channels_last
    return train_main(tokens)
