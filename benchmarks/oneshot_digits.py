"""Acceptance figures for calibrated one-shot sparsity on the bundled digits (scikit-learn ``load_digits``).

The narrow CNN of ``gumbel_digits.py`` is trained densely; then, without any weight fine-tuning:

* magnitude (per row, and shared by blocks of 4 output channels: ``shared_rows=4``, the CPU's rows4 kernels),
  magnitude + BatchNorm recalibration, Wanda and SparseGPT-style one-shot masks (per row and shared by 4 rows,
  each with and without BatchNorm recalibration) for 2:4, 1:4 and 75% constant fan-in (the 1-channel stem
  left dense, as N:M leaves it), calibrated on 512 unlabeled training images;
* learned 2:4 / 1:4 masks started from the SparseGPT mask (``method="gumbel", prior_from="sparsegpt"``,
  masks only, 2 epochs) - the start is exactly the one-shot SparseGPT model.

Prints a markdown table (mean over seeds, min, max, difference to dense) and writes it with ``--out``.

    OMP_NUM_THREADS=2 python benchmarks/oneshot_digits.py --seeds 3 --out benchmarks/results/oneshot.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gumbel_digits import accuracy, digits, narrow_cnn, train  # noqa: E402

import semisparse as ss  # noqa: E402

PATTERNS = ("2:4", "1:4", 0.75)


def name(pat: object) -> str:
    return "fan-in 75%" if isinstance(pat, float) else str(pat)


def shared_calibrated(calib: list[torch.Tensor]) -> list[tuple[str, dict]]:
    """Wanda and SparseGPT with masks shared by blocks of 4 output channels, with and without BN recalibration."""
    rows = []
    for method in ("wanda", "sparsegpt"):
        kw = {"method": method, "calibration": calib, "shared_rows": 4}
        rows += [(f"{method}, shared by 4 rows", kw),
                 (f"{method}, shared by 4 rows + BN recalibration", {**kw, "recalibrate_bn": True})]
    return rows


def run_seed(seed: int, args) -> dict[str, float]:
    torch.manual_seed(seed)
    xtr, ytr, xva, yva = digits(seed)
    dense = narrow_cnn(args.width)
    train(dense, xtr, ytr, args.dense_epochs, 3e-3, 32, seed, wd=1e-4)
    g = torch.Generator().manual_seed(seed)
    calib_x = xtr[torch.randperm(len(xtr), generator=g)[: args.calib]]
    calib = list(calib_x.split(64))
    res = {"dense": accuracy(dense, xva, yva)}
    for pat in PATTERNS:
        for label, kw in (
            ("magnitude", {}),
            ("magnitude + BN recalibration", {"recalibrate_bn": True, "calibration": calib}),
            ("magnitude, shared by 4 rows", {"shared_rows": 4}),
            ("magnitude, shared by 4 rows + BN recalibration", {"shared_rows": 4, "recalibrate_bn": True,
                                                               "calibration": calib}),
            ("wanda", {"method": "wanda", "calibration": calib}),
            ("sparsegpt", {"method": "sparsegpt", "calibration": calib}),
            ("sparsegpt + BN recalibration", {"method": "sparsegpt", "calibration": calib, "recalibrate_bn": True}),
            *shared_calibrated(calib),
        ):
            m = copy.deepcopy(dense)
            if isinstance(pat, float):
                kw = {**kw, "exclude": "0"}  # the 1-channel stem stays dense, as N:M leaves it
            ss.sparsify(m, pat, **kw)
            ss.check(m)
            res[f"{label} {name(pat)}"] = accuracy(m, xva, yva)
    for pat in ("2:4", "1:4") if args.finetune_epochs else ():  # the weights fine-tuned under fixed masks
        for label, shared in (("magnitude", 1), ("magnitude, shared by 4 rows", 4)):
            m = copy.deepcopy(dense)
            ss.sparsify(m, pat, shared_rows=shared)
            torch.manual_seed(seed)
            train(m, xtr, ytr, args.finetune_epochs, 1e-3, 32, seed, wd=1e-4)
            ss.check(m)
            res[f"{label} {pat} + {args.finetune_epochs} epochs fine-tune"] = accuracy(m, xva, yva)
    steps = args.mask_epochs * ((len(ytr) + args.bs - 1) // args.bs)
    for pat in ("2:4", "1:4") if args.mask_epochs else ():
        m = copy.deepcopy(dense)
        ss.sparsify(m, pat, method="gumbel", prior_from="sparsegpt", calibration=calib, trainable="mask",
                    total_steps=steps, prior=args.prior)  # fmt: skip
        res[f"learned {pat} from sparsegpt (start)"] = accuracy(m, xva, yva)
        torch.manual_seed(seed)
        train(m, xtr, ytr, args.mask_epochs, args.lr, args.bs, seed)
        ss.check(m)
        res[f"learned {pat} from sparsegpt, 2 epochs"] = accuracy(m, xva, yva)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the per-seed results here")
    p.add_argument("--merge", nargs="+", default=None, help="only print the table of these --json files")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--dense-epochs", type=int, default=15)
    p.add_argument("--calib", type=int, default=512, help="calibration images (unlabeled, from the train split)")
    p.add_argument("--mask-epochs", type=int, default=2, help="0: no learned-mask rows")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="> 0: also magnitude masks (per row and shared by 4 rows) with the weights fine-tuned")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--prior", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows: dict[str, list[float]] = {}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.merge:
        seeds, seconds = [], 0.0
        for path in args.merge:
            with open(path) as f:
                part = json.load(f)
            seeds += part["seeds"]
            seconds += part["seconds"]
            for k, v in part["rows"].items():
                rows.setdefault(k, []).extend(v)
        t0 -= seconds
    else:
        for seed in seeds:
            for k, v in run_seed(seed, args).items():
                rows.setdefault(k, []).append(v)
            print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"seeds": seeds, "seconds": time.time() - t0, "rows": rows}, f)
    dense = rows["dense"]
    lines = [
        f"Digits (sklearn load_digits, 80/20 split, 359 validation images), narrow CNN width {args.width} "
        f"(BatchNorm), seeds {seeds}, {args.dense_epochs} dense epochs; calibration: {args.calib} unlabeled "
        f"training images; no weight fine-tuning except the rows that say so ({args.finetune_epochs} epochs, AdamW "
        f"lr 1e-3, batch 32, masks fixed); learned masks: {args.mask_epochs} epochs, masks only, AdamW lr "
        f"{args.lr}, batch {args.bs}, prior {args.prior}. {time.time() - t0:.0f} s of runs, {args.threads} "
        "thread(s) each.",
        "",
        "| method | top-1 mean | min | max | vs dense (pp) |",
        "|---|---|---|---|---|",
    ]
    for k, v in rows.items():
        diff = statistics.mean(a - b for a, b in zip(v, dense))
        lines.append(f"| {k} | {statistics.mean(v):.2f} | {min(v):.2f} | {max(v):.2f} | {diff:+.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
