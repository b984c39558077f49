"""How much a dense runtime's thread pool, run just before, slows the deployed model (and back).

ResNet-50 at SRigL-like 90% constant fan-in, batch 1: ``ss.deploy`` and onnxruntime timed (a) interleaved call
by call, each call right after the other runtime's, and (b) each alone in blocks that start after a pause
(:func:`semisparse.runtime.timing.blocked_medians` with ``settle_s``), as in a process serving one runtime.
Several rounds, medians per round, load printed. ``--smoke``: ResNet-18 at 64x64, one round.

    PYTHONPATH=src python benchmarks/neighbour_effect.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

import semisparse as ss
from semisparse.cli.bench_common import srigl_like_masks
from semisparse.io.onnx_export import export_onnx
from semisparse.models import create_model
from semisparse.runtime.timing import blocked_medians, interleaved_medians


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    import onnxruntime as ort

    name, size, reps = ("resnet18", 64, 4) if args.smoke else (args.model, 224, 20)
    rounds = 1 if args.smoke else args.rounds
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = create_model(name).eval()
    ss.sparsify(model, None, masks=srigl_like_masks(model, 0.9, 0.1))
    x = torch.randn(1, 3, size, size)
    dep = ss.deploy(model, example_input=x)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "m.onnx", x)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    fns = [lambda: dep(x), lambda: sess.run(None, feed)]
    print(f"{name} 1x3x{size}x{size}, fan-in 0.9, {args.threads} threads, onnxruntime {ort.__version__}")
    with torch.no_grad():
        for r in range(rounds):
            i = interleaved_medians(fns, reps, warmup=3, budget_s=1e9)
            b = blocked_medians(fns, 2 * reps, rounds=8, warmup=2, settle_s=0.5)
            print(f"round {r}: interleaved ss.deploy {i[0] * 1e3:.1f} ms, onnxruntime {i[1] * 1e3:.1f} ms "
                  f"({i[1] / i[0]:.2f}x) | alone ss.deploy {b[0] * 1e3:.1f} ms, onnxruntime {b[1] * 1e3:.1f} ms "
                  f"({b[1] / b[0]:.2f}x) | load {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
