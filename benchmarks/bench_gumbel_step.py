"""Learned-mask training step vs the dense step, same model, same process (target: <= 1.3x dense).

ResNet-18 at 224x224, batch 32, fp32, CPU by default. Each variant runs forward + backward + AdamW step;
medians over ``--reps`` timed steps after ``--warmup`` untimed ones, variants interleaved so machine
noise hits all of them alike.

    OMP_NUM_THREADS=2 python benchmarks/bench_gumbel_step.py --threads 2 --out benchmarks/results/gumbel.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

import semisparse as ss


def make_variants(model_name: str, steps: int) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    torch.manual_seed(0)
    base = getattr(torchvision.models, model_name)(weights=None)
    out = {}
    dense = copy.deepcopy(base)
    out["dense"] = dense
    for trainable in ("mask", "all"):
        m = copy.deepcopy(base)
        ss.sparsify(m, "2:4", method="gumbel", trainable=trainable, total_steps=steps)
        out[f"learned 2:4, trainable={trainable}"] = m
    return {
        k: (m.train(), torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3))
        for k, m in out.items()
    }


def step(model, opt, x, y) -> float:
    t = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-numba", action="store_true", help="use the pure-torch sampling path")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.no_numba:
        from semisparse.masking import gumbel

        gumbel.USE_NUMBA = False
    variants = make_variants(args.model, steps=1000)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 1000, (args.batch,), device=args.device)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for m, _ in variants.values():
        m.to(args.device)
    for i in range(args.warmup + args.reps):
        for k, (m, opt) in variants.items():
            t = step(m, opt, x, y)
            if args.device != "cpu":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[k].append(t)
    dense = statistics.median(times["dense"])
    lines = [
        f"{args.model}, {args.size}x{args.size}, batch {args.batch}, fp32, {args.device}, "
        f"{args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"sampling: {'torch' if args.no_numba else 'numba'}; "
        f"median of {args.reps} steps (forward + backward + AdamW), after {args.warmup} warm-up",
        "",
        "| variant | median step (s) | min | max | ratio vs dense |",
        "|---|---|---|---|---|",
    ]
    for k, v in times.items():
        med = statistics.median(v)
        lines.append(f"| {k} | {med:.3f} | {min(v):.3f} | {max(v):.3f} | {med / dense:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n## Learned-mask training step (`benchmarks/bench_gumbel_step.py`)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
