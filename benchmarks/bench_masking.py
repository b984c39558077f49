"""How long ss.sparsify takes to mask every eligible layer of standard models (CPU, median of runs).

Usage: python benchmarks/bench_masking.py [--threads 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision

import semisparse as ss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "convnext_tiny", "vit_b_16"])
    ap.add_argument("--patterns", nargs="+", default=["2:4", "0.9"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    print(f"{'model':<16}{'pattern':<9}{'layers':>7}{'median s':>10}{'min s':>8}")
    for name in args.models:
        for pat in args.patterns:
            pattern = float(pat) if ":" not in pat else pat
            times = []
            for _ in range(args.reps):
                model = getattr(torchvision.models, name)(weights=None)
                t = time.perf_counter()
                rep = ss.sparsify(model, pattern)
                times.append(time.perf_counter() - t)
            print(f"{name:<16}{pat:<9}{len(rep.sparse_layers):>7}{statistics.median(times):>10.3f}{min(times):>8.3f}")


if __name__ == "__main__":
    main()
