"""A/B: does the cache-line alignment of the conv kernel's input loads matter on this CPU?

For each 3x3 conv of ResNet-50 (SRigL-like 90% fan-in masks), the layer's condensed kernel runs on its own
packed input, call by call interleaved, with (a) the real offset table: tap shifts of 1-2 floats and row widths
that are not multiples of 8 leave about 7/16 of the 32-byte loads split across two cache lines; (b) every
offset rounded down to a multiple of 8 floats: no split, same number of loads, same footprint, other values;
(c) only the tap's row shift rounded (as if each row were padded to a multiple of 8 floats: the 1-2 float
column shifts stay). (a)/(b) bounds what any padding or shifted-copy layout could win on that kernel.

    PYTHONPATH=src python benchmarks/align_ab.py --threads 2 --reps 41
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from semisparse.cli.bench_common import srigl_like_masks
from semisparse.models import create_model
from semisparse.runtime.cpu import kernels
from semisparse.runtime.cpu.layers import SparseConv
from semisparse.runtime.timing import interleaved_medians


def interleaved(fns, reps):
    """Medians of ``fns`` called in turn, in a fixed order, one warm-up each (no time budget)."""
    return interleaved_medians(fns, reps, warmup=1, budget_s=float("inf"), shuffle=False)


def one_layer(n: str, conv, key: str, mask, xi, reps: int) -> None:
    """Time the three offset tables of one layer (spmm/64 and 16 KiB tiles), interleaved."""
    layer = SparseConv(key, conv, conv.weight.detach(), mask, conv.bias)
    g = layer._plan_geometry(1, tuple(xi.shape[2:]))
    X = layer.prepare_input(xi, g)
    off = g["off"].tensor()
    aligned = (off - off % 8).contiguous()
    wq = g["planes"][-1]
    cs = g["c_stride"]
    ch, rem = off // cs, off % cs
    dy, dx = rem // wq, rem % wq
    rows8 = (ch * cs + dy * (-(-wq // 8) * 8) + dx).to(torch.int32).contiguous()
    rows8 = torch.minimum(rows8, off.max().expand_as(rows8)).contiguous()  # stay inside X
    W = layer._kvalues()
    orow = layer._tables()["orow"]
    full = g["plane"]
    Y = torch.empty(layer.out_channels * full)
    channel = (off // cs).long()
    for setting in ("spmm64", "tiled16K"):
        fns = []
        for o in (off, aligned, rows8):
            if setting == "spmm64":
                fns.append(lambda o=o: kernels.spmm(X, W, o, None, orow, Y, g["P"], full, 64, 64))
            else:
                span = 3 * (64 + 2) * 4  # three rows of a 64-block per channel (roughly the planner's span)
                Wt, ot, seg = kernels.tile(W, o, channel, max(1, 16 * 1024 // span))
                fns.append(lambda Wt=Wt, ot=ot, seg=seg: kernels.spmm_tiled(X, Wt, ot, seg, None, orow, Y,
                                                                            g["P"], full, 64, 64))
        t = interleaved(fns, reps)
        shape = f"{layer.in_channels}->{layer.out_channels} {tuple(xi.shape[2:])}"
        print(f"{n:16s} {shape:24s} {W.shape[1]:4d} {setting:10s} {t[0] * 1e3:8.3f} {t[1] * 1e3:8.3f} "
              f"{t[2] * 1e3:8.3f} {t[0] / t[1]:7.2f} {t[0] / t[2]:10.2f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=41)
    p.add_argument("--layers", nargs="*", default=["layer1.0.conv2", "layer2.1.conv2", "layer3.1.conv2",
                                                   "layer4.1.conv2"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("resnet50").eval()
    masks = srigl_like_masks(model, 0.9, 0.1)
    x = torch.randn(1, 3, 224, 224)
    inputs = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach().clone()))
             for n in args.layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    print(f"threads {args.threads}, load {os.getloadavg()[0]:.2f}, SIMD {kernels.simd_width()}")
    print(f"{'layer':16s} {'shape':24s} {'k':>4s} {'setting':10s} {'real ms':>8s} {'aligned':>8s} {'rows8':>8s} "
          f"{'real/al':>7s} {'real/rows8':>10s}")
    for n in args.layers:
        key = next(k for k in masks if k.startswith(n + "."))
        one_layer(n, mods[n], key, masks[key], inputs[n], args.reps)
    print(f"load after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
