"""Deployed vs dense when the process has fewer CPUs than it was planned on (CPU, batch 1, one process).

Two workloads, each deployed (planned) on two idle CPUs: a 90% Linear 3072 -> 768 and a 90% ResNet-18 at
64x64. Each is then timed against its dense self (the same model with its masks multiplied in, run by torch
as torch runs it) in three conditions:

* ``2 cpus``: the process on two CPUs, nothing else running there;
* ``pinned``: every thread of the process moved to one of them after planning (what ``taskset`` or a
  container's CPU set does);
* ``busy neighbour``: two CPUs, and another process spinning on one of them.

Medians of interleaved calls. The figures are only worth quoting from a machine nobody else loads.
Usage: python benchmarks/bench_affinity.py [--cpus 0 1] [--reps 50] [--sparsity 0.9] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator

import torch
import torchvision
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy
from semisparse.runtime.cpu import cpus
from semisparse.runtime.cpu.planner import interleaved_medians


def pin(cpu_set: set[int]) -> None:
    """Every thread of this process (torch's and OpenMP's included) onto ``cpu_set``."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpu_set)


@contextlib.contextmanager
def condition(name: str, pair: list[int]) -> Iterator[None]:
    """The process on both CPUs of ``pair``; ``pinned``: on the first only; ``busy neighbour``: a spinning
    process on the second."""
    pin(set(pair))
    neighbour = None
    if name == "pinned":
        pin({pair[0]})
    elif name == "busy neighbour":
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setaffinity(neighbour.pid, {pair[1]})
    time.sleep(0.3)  # the CPU readings of deployed models are at most 0.1 s old after this
    try:
        yield
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
        pin(set(pair))


def workloads(sparsity: float) -> list[tuple[str, nn.Module, nn.Module, torch.Tensor]]:
    """``(name, dense, masked, input)``: the dense model holds the masked weights."""
    torch.manual_seed(0)
    lin = nn.Linear(3072, 768)
    ss.sparsify(lin, sparsity)
    resnet = torchvision.models.resnet18(weights=None).eval()
    ss.sparsify(resnet, sparsity)
    out = []
    for name, model, x in ((f"Linear 3072->768 {sparsity:g}", lin, torch.randn(1, 3072)),
                           (f"ResNet-18 {sparsity:g}, 64x64", resnet, torch.randn(1, 3, 64, 64))):
        dense = ss.finalize(copy.deepcopy(model)).eval().requires_grad_(False)
        out.append((name, dense, model.eval(), x))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", type=int, nargs=2, default=None, help="the two CPUs to use (default: the first two)")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per candidate and condition (median)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args()
    every = sorted(os.sched_getaffinity(0))
    pair = args.cpus or every[:2]
    if len(set(pair)) < 2 or not set(pair) <= set(every):
        sys.exit(f"needs two CPUs this process may use, got {pair} of {every}")
    torch.set_num_threads(2)
    rows = []
    for name, dense, masked, x in workloads(args.sparsity):
        with condition("2 cpus", pair):
            dep = deploy(masked, example_input=x)
        for cond in ("2 cpus", "pinned", "busy neighbour"):
            with condition(cond, pair), torch.no_grad():
                threads = cpus.threads_now()
                fns = [lambda d=dense, x=x: d(x), lambda d=dep, x=x: d(x)]
                t_dense, t_dep = interleaved_medians(fns, args.reps, warmup=3, budget_s=5.0)
            rows.append({"workload": name, "condition": cond, "dense_ms": round(t_dense * 1e3, 4),
                         "deployed_ms": round(t_dep * 1e3, 4), "ratio": round(t_dense / t_dep, 2),
                         "deployed_threads": threads, "torch_threads": torch.get_num_threads()})
            print(f"{name:<26} {cond:<15} dense {t_dense * 1e3:10.3f} ms  deployed {t_dep * 1e3:10.3f} ms  "
                  f"{t_dense / t_dep:6.2f}x", flush=True)
        own = next(r["deployed_ms"] for r in rows if r["workload"] == name and r["condition"] == "2 cpus")
        for r in rows:
            if r["workload"] == name:
                r["deployed_vs_own_2cpu"] = round(r["deployed_ms"] / own, 2)
    pin(set(every))
    head = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, CPUs {pair}, "
            f"load average {os.getloadavg()[0]:.1f}")
    print(f"\n{head}\n")
    print("| workload | condition | dense ms | deployed ms | deployed vs dense | deployed vs its 2-CPU time |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['condition']} | {r['dense_ms']:.3f} | {r['deployed_ms']:.3f} | "
              f"{r['ratio']:.2f}x | {r['deployed_vs_own_2cpu']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": head, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
