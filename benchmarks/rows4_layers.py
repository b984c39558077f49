"""2:4 layers at batch 1 with per-row masks and with masks shared by blocks of 4 output channels (rows4).

For ResNet-50's conv shapes (batch 1) and ViT-B/16's and ConvNeXt-T's Linear shapes, one process, call by call
interleaved: torch's dense layer (conv: NCHW and channels-last; Linear: ``F.linear``), ``ss.deploy`` of the
layer with per-row magnitude 2:4 (its fastest kernel setting), and ``ss.deploy`` with
``ss.sparsify(shared_rows=4)`` masks run by the rows4 setting. Ratios against the faster torch dense form.

    PYTHONPATH=src python benchmarks/rows4_layers.py --reps 30
"""

from __future__ import annotations

import argparse
import copy
import os
import platform

import torch
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy, timing

CONVS = [(64, 256, 1, 1, 56), (256, 64, 1, 1, 56), (64, 64, 3, 1, 56), (128, 128, 3, 2, 56), (512, 128, 1, 1, 28),
         (128, 512, 1, 1, 28), (128, 128, 3, 1, 28), (1024, 256, 1, 1, 14), (256, 1024, 1, 1, 14),
         (256, 256, 3, 1, 14), (2048, 512, 1, 1, 7), (512, 2048, 1, 1, 7), (512, 512, 3, 1, 7)]
LINEARS = [(768, 2304, 197), (768, 768, 197), (768, 3072, 197), (3072, 768, 197),  # ViT-B/16
           (96, 384, 3136), (384, 96, 3136), (384, 1536, 196), (1536, 384, 196)]  # ConvNeXt-T stages 1 and 3


def fastest(dep: nn.Module, x: torch.Tensor) -> nn.Module:
    """``dep`` set to its fastest kernel setting for ``x`` (interleaved medians)."""
    settings = dep.variants(x)
    with torch.no_grad():
        t = timing.interleaved_medians([lambda s=s: (dep.use_variant(s), dep(x)) for s in settings], reps=10)
    dep.use_variant(settings[min(range(len(settings)), key=t.__getitem__)])
    return dep


def layer_row(layer: nn.Module, x: torch.Tensor, reps: int, channels_last: bool) -> list[float]:
    """Medians (s): torch dense, [torch channels-last,] ss 2:4 per row, ss 2:4 rows4."""
    per_row, shared = copy.deepcopy(layer), copy.deepcopy(layer)
    ss.sparsify(per_row, "2:4")
    ss.sparsify(shared, "2:4", shared_rows=4)
    dense = copy.deepcopy(per_row)
    ss.finalize(dense)
    deps = [fastest(deploy(copy.deepcopy(m), plan="condensed"), x) for m in (per_row, shared)]
    rows4 = deps[1].variants(x)[-1]
    assert rows4.get("rows4"), "the shared masks' layer offers no rows4 setting"
    deps[1].use_variant(rows4)
    fns = [lambda: dense(x)]
    if channels_last:
        dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fns.append(lambda: dense_cl(x_cl))
    fns += [lambda: deps[0](x), lambda: deps[1](x)]
    with torch.no_grad():
        return timing.interleaved_medians(fns, reps=reps, budget_s=float("inf"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, fp32, medians of {args.reps} "
          f"interleaved calls (ms); load avg {os.getloadavg()[0]:.2f}")
    print("layer                              dense  dense-CL  2:4/row  2:4 rows4  row vs best dense  "
          "rows4 vs best dense")
    for cin, cout, k, s, hw in CONVS:
        torch.manual_seed(0)
        t = layer_row(nn.Conv2d(cin, cout, k, stride=s, padding=k // 2, bias=False).eval(),
                      torch.randn(1, cin, hw, hw), args.reps, channels_last=True)
        best = min(t[:2])
        print(f"conv {cin:4d}->{cout:4d} k{k} s{s} {hw:2d}x{hw:<2d}      {t[0] * 1e3:7.3f}  {t[1] * 1e3:8.3f}  "
              f"{t[2] * 1e3:7.3f}  {t[3] * 1e3:9.3f}  {best / t[2]:17.2f}x  {best / t[3]:18.2f}x", flush=True)
    for fin, fout, tokens in LINEARS:
        torch.manual_seed(0)
        t = layer_row(nn.Linear(fin, fout).eval(), torch.randn(tokens, fin), args.reps, channels_last=False)
        print(f"linear {fin:4d}->{fout:4d} x{tokens:<4d}          {t[0] * 1e3:7.3f}  {'':>8}  {t[1] * 1e3:7.3f}  "
              f"{t[2] * 1e3:9.3f}  {t[0] / t[1]:17.2f}x  {t[0] / t[2]:18.2f}x", flush=True)
    print(f"load avg after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
