"""Probe for issue 24's 2:4 target: would 2:4 masks whose blocks of 4 output channels share their kept inputs
(still 2:4 in every row) let a batch-1 conv beat the dense one on AVX2, where per-row 2:4 does not?

For ResNet-50's 1x1 conv shapes at batch 1, one process, call by call interleaved: torch dense (NCHW and
channels-last, oneDNN), ``ss.deploy`` of the layer with a 2:4 mask (its fastest kernel setting), and the
4-row shared-input kernel of ``shared_rows_probe.c`` (compiled here, input copied into its padded buffer
each call, as a deployed layer would). The masks are the same for all (block-shared 2:4 by summed magnitude).

    PYTHONPATH=src python benchmarks/shared_rows_probe.py --reps 30
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy, timing

SHAPES = [(64, 256, 56), (256, 64, 56), (128, 512, 28), (512, 128, 28), (256, 1024, 14), (1024, 256, 14),
          (512, 2048, 7), (2048, 512, 7)]


def build() -> ctypes.CDLL:
    out = Path(tempfile.mkdtemp()) / "shared_rows_probe.so"
    src = Path(__file__).with_name("shared_rows_probe.c")
    subprocess.run(["cc", "-O3", "-march=haswell", "-mtune=native", "-fopenmp", "-fPIC", "-shared", str(src), "-o",
                    str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.shared_rows4.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return lib


def block_shared_24(weight: torch.Tensor) -> torch.Tensor:
    """2:4 along the inputs, the same 2 kept in every block of 4 output rows (largest summed |w|)."""
    cout, cin = weight.shape[:2]
    score = weight.detach().view(cout // 4, 4, cin // 4, 4).abs().sum(1)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(2, score.topk(2, dim=2).indices, True)
    return keep.unsqueeze(1).expand(-1, 4, -1, -1).reshape(weight.shape)


def probe(lib: ctypes.CDLL, cin: int, cout: int, hw: int, reps: int, threads: int) -> list[float]:
    """Medians (s) of torch NCHW, torch channels-last, ``ss.deploy`` and the shared-rows kernel on one shape."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 1, bias=False).eval()
    x = torch.randn(1, cin, hw, hw)
    mask = block_shared_24(conv.weight)
    ss.sparsify(conv, None, masks={"weight": mask})
    with torch.no_grad():
        ref = conv(x)
        dep = deploy(copy.deepcopy(conv), plan="condensed", example_input=x)
        settings = dep.variants(x)
        ts = timing.interleaved_medians([lambda s=s: (dep.use_variant(s), dep(x)) for s in settings], reps=10)
        dep.use_variant(settings[min(range(len(settings)), key=ts.__getitem__)])
        dense = nn.Conv2d(cin, cout, 1, bias=False).eval()
        dense.weight.copy_(conv.weight * mask)
    dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    P, nb, k = hw * hw, cout // 4, cin // 2
    ldx = -(-P // 24) * 24
    cols = (mask[::4, :, 0, 0].view(nb, cin // 4, 4).nonzero()[:, 2].view(nb, cin // 4, 2)
            + 4 * torch.arange(cin // 4).view(1, -1, 1)).reshape(nb, k)
    W = (conv.weight * mask).detach().view(nb, 4, cin).gather(2, cols.unsqueeze(1).expand(-1, 4, -1))
    W = W.permute(0, 2, 1).contiguous()
    off = (cols * ldx).to(torch.int32).contiguous()
    X, Y = torch.zeros(cin, ldx), torch.empty(cout, ldx)

    def shared():
        X[:, :P].copy_(x.view(cin, P))
        lib.shared_rows4(X.data_ptr(), W.data_ptr(), off.data_ptr(), Y.data_ptr(), nb, k, ldx, threads)
        return Y

    shared()
    err = float((Y[:, :P].view(1, cout, hw, hw) - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, err
    with torch.no_grad():
        return timing.interleaved_medians([lambda: dense(x), lambda: dense_cl(x_cl), lambda: dep(x), shared],
                                          reps=reps, budget_s=float("inf"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lib = build()
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, fp32, batch 1, medians of "
          f"{args.reps} interleaved calls (ms)")
    print("shape                     torch NCHW  torch CL  ss 2:4  shared-rows  shared/best dense  ss/best dense")
    for cin, cout, hw in SHAPES:
        t = probe(lib, cin, cout, hw, args.reps, args.threads)
        best = min(t[0], t[1])
        print(f"{cin:4d}->{cout:4d} 1x1 {hw:2d}x{hw:<2d}      {t[0] * 1e3:7.3f}  {t[1] * 1e3:8.3f}  {t[2] * 1e3:6.3f}  "
              f"{t[3] * 1e3:11.3f}  {best / t[3]:16.2f}x  {best / t[2]:12.2f}x", flush=True)


if __name__ == "__main__":
    main()
