"""A/B of two builds of condensed.c in one process: ss_spmm on ResNet-50's 7x7 layers (SRigL-like 90% fan-in),
whose 49-position plane is one block: the old build runs 64 lanes (8 vectors) per row, a build with narrower
rows 56 (7 vectors). Call by call interleaved, medians; both libraries share torch's OpenMP pool.

    gcc -O3 -std=gnu11 -march=haswell -mtune=native -fopenmp -fPIC -shared OLD.c -o /tmp/old.so  (and NEW)
    PYTHONPATH=src python benchmarks/row_width_ab.py /tmp/old.so /tmp/new.so --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

import torch

from semisparse.cli.bench_common import srigl_like_masks
from semisparse.models import create_model
from semisparse.runtime.cpu import kernels
from semisparse.runtime.cpu.kernels import binding
from semisparse.runtime.cpu.layers import SparseConv
from semisparse.runtime.timing import interleaved_medians

LAYERS = ["layer4.0.conv3", "layer4.1.conv1", "layer4.1.conv3", "layer4.2.conv1", "layer4.0.downsample.0"]


def one_layer(n: str, conv, key: str, mask, xi, libs, threads: int, reps: int) -> None:
    """Time ss_spmm of each library on one layer, interleaved; say whether the outputs agree bitwise."""
    layer = SparseConv(key, conv, conv.weight.detach(), mask, conv.bias)
    g = layer._plan_geometry(1, tuple(xi.shape[2:]))
    X = layer.prepare_input(xi, g)
    W, off, orow = layer._kvalues(), g["off"].tensor(), layer._tables()["orow"].tensor()
    rows, k = W.shape
    full = g["plane"]
    by_blocks = kernels.split_by_blocks(g["P"], 64, rows, threads)
    ys = [torch.zeros(layer.out_channels * full) for _ in libs]
    fns = [lambda lib=lib, Y=Y: lib.ss_spmm(X.data_ptr(), W.data_ptr(), off.data_ptr(), None, orow.data_ptr(),
                                            Y.data_ptr(), rows, k, g["P"], full, 1, 64, 64, by_blocks)
           for lib, Y in zip(libs, ys)]
    for lib in libs:
        lib.ss_sync_threads(threads)
    t = interleaved_medians(fns, reps, warmup=1, budget_s=float("inf"), shuffle=False)
    same = torch.equal(ys[0], ys[1])
    print(f"{n:24s} P={g['P']:4d} rows {rows:5d} k {k:4d}  old {t[0] * 1e3:7.3f} ms  new {t[1] * 1e3:7.3f} ms  "
          f"old/new {t[0] / t[1]:5.2f}  bitwise equal {same}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("libs", nargs=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=61)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    libs = [ctypes.CDLL(path) for path in args.libs]
    for lib in libs:
        binding._bind(lib)
    torch.manual_seed(0)
    model = create_model("resnet50").eval()
    masks = srigl_like_masks(model, 0.9, 0.1)
    mods = dict(model.named_modules())
    inputs = {}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach().clone()))
             for n in LAYERS]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    print(f"threads {args.threads}, load {os.getloadavg()[0]:.2f}")
    for n in LAYERS:
        key = next(k for k in masks if k.startswith(n + "."))
        one_layer(n, mods[n], key, masks[key], inputs[n], libs, args.threads, args.reps)
    print(f"load after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
