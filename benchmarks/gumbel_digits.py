"""Acceptance figures for learned N:M masks on the bundled digits (scikit-learn ``load_digits``).

A narrow CNN is trained densely; then, with the dense weights frozen (no weight fine-tuning anywhere):

* one-shot magnitude N:M (and the same with channel permutation first),
* learned N:M masks (``ss.sparsify(method="gumbel", trainable="mask")``), at most 2 epochs of mask training,

for 2:4 and 1:4 (``--patterns``), over several seeds; prints a markdown table (mean, spread) and writes it with
``--out``. ``--shared-rows 1 4`` also runs the magnitude and learned masks shared by blocks of 4 output channels
(``shared_rows=4``: the CPU deploy's rows4 kernels), on the same dense models.

    OMP_NUM_THREADS=2 python benchmarks/gumbel_digits.py --seeds 5 --out benchmarks/results/gumbel.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import semisparse as ss


def narrow_cnn(width: int = 16) -> nn.Module:
    """8x8x1 -> 10 classes; every layer but the 1-channel stem takes N:M."""
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10),
    )


def digits(seed: int) -> tuple[torch.Tensor, ...]:
    """Train/validation split (80/20, stratified by a seeded shuffle): ``(N, 1, 8, 8)`` in [0, 1]."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(1000 + seed)
    idx = torch.randperm(len(y), generator=g)
    n_val = len(y) // 5
    return x[idx[n_val:]], y[idx[n_val:]], x[idx[:n_val]], y[idx[:n_val]]


def batches(x, y, bs, gen):
    order = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), bs):
        j = order[i : i + bs]
        yield x[j], y[j]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) * 100


def train(model, x, y, epochs, lr, bs, seed, params=None, wd=0.0):
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    steps = epochs * ((len(y) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        model.train()
        for xb, yb in batches(x, y, bs, gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


KEPT: dict[str, list[tuple[float, float]]] = {}  # "2:4 layer" -> per seed (kept |w| share before, after)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, bs: int = 64) -> None:
    """Re-estimate BatchNorm running statistics under the masks (no weight changes): a fairer baseline."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass
    model.train()
    for i in range(0, len(x), bs):
        model(x[i : i + bs])


def random_matrices(seeds: int = 5) -> list[str]:
    """Kept |w| share of N:M magnitude masks on random 64x128 Gaussian matrices, with and without permutation."""
    from semisparse.masking.permute import kept_fraction, search_permutation
    from semisparse.patterns import NM

    lines = ["| pattern | plain N:M | permuted | unstructured bound | share of the gap closed |",
             "|---|---|---|---|---|"]
    for n, m in ((2, 4), (1, 4), (4, 8)):
        rows = []
        for seed in range(seeds):
            w = torch.randn(64, 128, generator=torch.Generator().manual_seed(seed))
            perm = search_permutation([w], NM(n, m), rounds=200, patience=20)
            before, after = kept_fraction([w], NM(n, m)), kept_fraction([w], NM(n, m), perm)
            a = w.abs().flatten()
            bound = float(a.topk(a.numel() * n // m).values.sum() / a.sum())
            rows.append((before, after, bound))
        b, a, u = (statistics.mean(r[i] for r in rows) for i in range(3))
        lines.append(f"| {n}:{m} | {b:.4f} | {a:.4f} | {u:.4f} | {(a - b) / (u - b):.0%} |")
    return lines


def shared(pat: str, rows: int) -> str:
    """``pat`` as the table names it: ``"2:4"``, or ``"2:4 shared by 4 rows"``."""
    return pat if rows == 1 else f"{pat} shared by {rows} rows"


def run_seed(seed: int, args) -> dict[str, float]:
    torch.manual_seed(seed)
    xtr, ytr, xva, yva = digits(seed)
    dense = narrow_cnn(args.width)
    train(dense, xtr, ytr, args.dense_epochs, 3e-3, 32, seed, wd=1e-4)
    res = {"dense": accuracy(dense, xva, yva)}
    for pat in args.patterns:
        for rows in args.shared_rows:
            res.update(run_pattern(dense, pat, rows, seed, args, (xtr, ytr, xva, yva)))
    return res


def run_pattern(dense: nn.Module, pat: str, rows: int, seed: int, args, data) -> dict[str, float]:
    """One pattern, masks shared by ``rows`` output channels: magnitude (+ permutation, per-row masks only;
    + BN recalibration) and learned masks over the frozen dense weights."""
    xtr, ytr, xva, yva = data
    name, res = shared(pat, rows), {}
    steps = args.mask_epochs * ((len(ytr) + args.bs - 1) // args.bs)
    m = copy.deepcopy(dense)
    ss.sparsify(m, pat, shared_rows=rows)
    res[f"magnitude {name}"] = accuracy(m, xva, yva)
    if rows == 1:
        m = copy.deepcopy(dense)
        rep = ss.sparsify(m, pat, permute=True)
        res[f"magnitude {pat} + permutation"] = accuracy(m, xva, yva)
        for r in rep.layers:
            if "kept_after_perm" in r.extra:
                KEPT.setdefault(f"{pat} {r.name}", []).append((r.extra["kept_before_perm"],
                                                               r.extra["kept_after_perm"]))
    m = copy.deepcopy(dense)
    ss.sparsify(m, pat, shared_rows=rows)
    recalibrate_bn(m, xtr)
    res[f"magnitude {name} + BN recalibration"] = accuracy(m, xva, yva)
    m = copy.deepcopy(dense)
    ss.sparsify(m, pat, method="gumbel", trainable="mask", total_steps=steps, prior=args.prior,
                tau=tuple(args.tau), scale=tuple(args.scale), shared_rows=rows)
    before = {k: v.clone() for k, v in m.state_dict().items() if k.endswith("original")}
    torch.manual_seed(seed)
    train(m, xtr, ytr, args.mask_epochs, args.lr, args.bs, seed)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen weights changed"
    ss.check(m)
    for mask in ss.masks(m).values():  # every block of `rows` output channels keeps the same positions
        v = mask.reshape(mask.shape[0], -1)
        assert all(torch.equal(v[b : b + rows], v[b].expand_as(v[b : b + rows])) for b in range(0, len(v), rows))
    acc = accuracy(m, xva, yva)
    ss.finalize(m)
    assert accuracy(m, xva, yva) == acc
    res[f"learned {name}, frozen weights"] = acc
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--dense-epochs", type=int, default=15)
    p.add_argument("--mask-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--prior", type=float, default=3.0)
    p.add_argument("--tau", type=float, nargs=2, default=(4.0, 0.05))
    p.add_argument("--scale", type=float, nargs=2, default=(2.0, 20.0))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--patterns", nargs="+", default=["2:4", "1:4"])
    p.add_argument("--shared-rows", type=int, nargs="+", default=[1],
                   help="masks shared by blocks of this many output channels (each value a run; 1: per row)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        for k, v in run_seed(seed, args).items():
            rows.setdefault(k, []).append(v)
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)
    dense = rows["dense"]
    lines = [
        f"Digits (sklearn load_digits, 80/20 split, {len(xva_size(0))} validation images), narrow CNN width "
        f"{args.width}, {args.seeds} seeds; dense weights frozen after {args.dense_epochs} dense epochs; "
        f"learned masks: {args.mask_epochs} epochs, AdamW lr {args.lr}, batch {args.bs}, prior {args.prior}, "
        f"tau {args.tau[0]}->{args.tau[1]}, scale {args.scale[0]}->{args.scale[1]}, BN recalibrated. "
        f"No weight fine-tuning. {time.time() - t0:.0f} s, {args.threads} threads.",
        "",
        "| method | top-1 mean | min | max | std | vs dense (pp, mean of per-seed diffs) |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in rows.items():
        diff = statistics.mean(a - b for a, b in zip(v, dense))
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        lines.append(f"| {k} | {statistics.mean(v):.2f} | {min(v):.2f} | {max(v):.2f} | {sd:.2f} | {diff:+.2f} |")
    for pat in args.patterns:
        for n in args.shared_rows:
            name = shared(pat, n)
            gain = [a - b for a, b in zip(rows[f"learned {name}, frozen weights"], rows[f"magnitude {name}"])]
            lines.append(
                f"\nlearned {name} - magnitude {name}: mean {statistics.mean(gain):+.2f} pp, "
                f"per seed {', '.join(f'{g:+.2f}' for g in gain)}"
            )
    lines += ["", f"Kept |w| share of magnitude masks on the CNN's layers, mean over {args.seeds} seeds "
              "(channel permutation before / after):", "", "| layer | before | after |", "|---|---|---|"]
    for k, v in KEPT.items():
        lines.append(f"| {k} | {statistics.mean(b for b, _ in v):.4f} | {statistics.mean(a for _, a in v):.4f} |")
    lines += ["", "Random 64x128 Gaussian matrices (5 seeds), kept |w| share:", "", *random_matrices()]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n## Learned masks on digits (`benchmarks/gumbel_digits.py`)\n\n" + text + "\n")


def xva_size(seed: int) -> torch.Tensor:
    return digits(seed)[3]


if __name__ == "__main__":
    main()
