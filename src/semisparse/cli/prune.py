"""``semisparse prune``: one-shot sparsity of a trained model, calibrated on a few unlabeled batches.

Loads ``--model`` with ``--weights``, prunes it to ``--pattern`` (N:M) or ``--sparsity-level`` (constant
fan-in) with ``--method`` (``sparsegpt``: masks chosen and kept weights reconstructed from each layer's
input Hessian; ``wanda``; ``magnitude``) on ``--calib-batches`` training batches, optionally re-estimates
BatchNorm statistics, prints top-1 on the val split before and after, and writes the compressed file
(``-o``) and/or a checkpoint (``--output-dir``) that ``semisparse train --weights DIR/checkpoint.pth``
fine-tunes from. Data flags are ``train``'s.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

from ..errors import SemisparseError
from ..io.compressed import save
from ..masking import masks, sparsify
from ..patterns import NM, parse_pattern
from ..train.engine import checkpoint_dict, evaluate
from ..train.loaders import make_loaders
from ..train.run_folder import claim_output_dir
from . import train as train_cli

METHODS = ("sparsegpt", "wanda", "magnitude")
#: ``train`` flags that mean the same here (data, model, device).
SHARED = ("data_path", "model", "weights", "device", "batch_size", "workers", "seed", "train_crop_size",
          "val_resize_size", "val_crop_size", "interpolation", "cache_dataset", "skip_bad_images", "aug_for_2x4",
          "ignore_linear", "ignore_grouped")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semisparse prune", description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    for action in train_cli.get_args_parser(add_help=False)._actions:
        if action.dest in SHARED:
            p._add_action(action)
    a = p.add_argument
    a("--pattern", default=None, help="N:M pattern, e.g. 2:4 (default: 2:4 unless --sparsity-level is given)")
    a("--sparsity-level", default=None, type=float, help="constant fan-in sparsity in (0, 1) instead of N:M")
    a("--method", default="sparsegpt", choices=METHODS, help="one-shot method (default: sparsegpt)")
    a("--calib-batches", default=16, type=int, help="training batches of calibration inputs (default: 16)")
    a("--dampening", default=None, type=float, help="sparsegpt: share of the Hessian's mean diagonal added (0.01)")
    a("--shared-rows", default=None, type=int,
      help="each block of this many output neurons keeps the same positions (4: the CPU deploy's rows4 kernels "
           "read each input once for the block)")
    a("--recalibrate-bn", action="store_true", help="re-estimate BatchNorm statistics on the calibration batches")
    a("-o", "--output", default=None, help="write the compressed model here (.safetensors)")
    a("--output-dir", default=None, help="write checkpoint.pth here (for `semisparse train --weights`)")
    a("--overwrite", action="store_true", help="replace another run's files in --output-dir")
    a("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parsed flags on top of ``train``'s defaults (its data code reads them), with ``explicit`` set."""
    args = train_cli.get_args_parser().parse_args([])
    ours = get_args_parser().parse_args(argv)
    vars(args).update(vars(ours))
    probe = get_args_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    args.explicit = set(vars(probe.parse_args(argv)))
    return args


def _pattern(args: argparse.Namespace):
    if args.pattern is not None and args.sparsity_level is not None:
        raise SemisparseError("give --pattern (N:M) or --sparsity-level (constant fan-in), not both")
    if args.sparsity_level is not None:
        return parse_pattern(float(args.sparsity_level))
    return parse_pattern(args.pattern or "2:4")


class _Bar:
    """A progress bar over layers on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()

    def __call__(self, key: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // max(1, total)
        end = "\n" if done == total else ""
        print(f"\rpruning [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {key[:40]:<40}", end=end,
              file=sys.stderr, flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    pattern = _pattern(args)
    if args.calib_batches < 1:
        raise SemisparseError(f"--calib-batches must be at least 1, got {args.calib_batches}")
    if args.batch_size < 1:
        raise SemisparseError(f"-b/--batch-size must be at least 1, got {args.batch_size}")
    if args.method != "sparsegpt" and args.dampening is not None:
        raise SemisparseError("--dampening applies to --method sparsegpt only")
    if args.shared_rows is not None and args.shared_rows < 1:
        raise SemisparseError(f"--shared-rows must be at least 1, got {args.shared_rows}")
    if args.output is not None and not args.output.endswith(".safetensors"):
        raise SemisparseError(f"-o/--output writes a compressed .safetensors file, got {args.output}")
    if not args.output and not args.output_dir:
        print("no -o/--output or --output-dir: the pruned model is not written", flush=True)
    folder = claim_output_dir(args.output_dir, overwrite=args.overwrite) if args.output_dir else None
    try:
        return _prune(args, pattern, folder)
    finally:
        if folder is not None:
            folder.release()


def _prune(args: argparse.Namespace, pattern, folder) -> int:
    device = train_cli._device(args)
    torch.manual_seed(args.seed)
    data = train_cli._data(args)
    workers = args.workers
    if workers is None:
        workers = 0 if data.kind == "digits" else min(8, os.cpu_count() or 1)
    train_loader, val_loader = make_loaders(data, args.batch_size, workers, seed=args.seed,
                                            skip_bad_images=args.skip_bad_images, device=device)  # fmt: skip
    model, _ = train_cli._model(args, data)
    model = model.to(device)
    if args.weights is None:
        print("note: no --weights: pruning the model's initial (untrained) weights", file=sys.stderr, flush=True)
    criterion = nn.CrossEntropyLoss()
    before = evaluate(model, criterion, val_loader, device)
    print(f"before: val_loss {before['loss']:.4f} val_acc1 {before['acc1']:.2f} val_acc5 {before['acc5']:.2f} "
          f"({before['count']} images)", flush=True)  # fmt: skip
    opts: dict[str, object] = {}
    if args.method != "magnitude":
        opts["progress"] = _Bar(not args.quiet)
    if args.dampening is not None:
        opts["dampening"] = args.dampening
    if args.shared_rows is not None:
        opts["shared_rows"] = args.shared_rows
    needs_data = args.method != "magnitude" or args.recalibrate_bn
    example = next(iter(val_loader))[0][:1].to(device)
    rep = sparsify(
        model, pattern, args.method, example_input=example, pad=args.aug_for_2x4, ignore_linear=args.ignore_linear,
        ignore_grouped=args.ignore_grouped, calibration=train_loader if needs_data else None,
        collect=(lambda batch: batch[0]) if needs_data else None,
        calib_batches=args.calib_batches if needs_data else None, recalibrate_bn=args.recalibrate_bn, **opts,
    )  # fmt: skip
    after = evaluate(model, criterion, val_loader, device)
    print(rep)
    print(f"after ({args.method} {pattern}): "
          f"val_loss {after['loss']:.4f} val_acc1 {after['acc1']:.2f} val_acc5 {after['acc5']:.2f} "
          f"({after['count']} images)", flush=True)  # fmt: skip
    if args.output:
        path = save(model, args.output)
        print(f"wrote {path}")
    if folder is not None:
        # A checkpoint in train's format (masks and reconstructed weights under the parametrization keys);
        # `train --weights` reads its masked weights.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # no training state: a file to start from
        ckpt = checkpoint_dict(model, optimizer, None, -1, 0,
                               args={k: v for k, v in vars(args).items() if k != "explicit"})  # fmt: skip
        ckpt["sparsity"] = {"masks": masks(model), "method": args.method, "state": None,
                            "pattern": str(pattern) if isinstance(pattern, NM) else f"{pattern.sparsity:g}"}
        ckpt["prune"] = {"method": args.method, "val_acc1_before": before["acc1"], "val_acc1_after": after["acc1"]}
        folder.save(ckpt, 0)
        print(f"wrote {os.path.join(args.output_dir, 'checkpoint.pth')} (fine-tune with these masks fixed: "
              f"semisparse train --weights {os.path.join(args.output_dir, 'checkpoint.pth')} ...)")  # fmt: skip
    return 0

