"""Per-layer profile of a deployed model against dense runtimes, one layer at a time.

Each deployed sparse conv/linear is called alone on the input it sees inside the model (captured with a
forward hook), interleaved call by call with the same layer dense: torch NCHW, torch channels-last
(oneDNN), and onnxruntime on a one-layer ONNX graph (``--ort``). Prints a table with ms, useful GFLOP/s
(kept MACs x 2 / time) and the share of the model's time, plus the time outside the timed layers.

    PYTHONPATH=src python benchmarks/layer_profile.py --model resnet50 --pattern 2:4 --ort

``--pattern``: ``fan-in`` (SRigL-like, ``--sparsity``), ``2:4`` (per-row magnitude) or ``2:4-rows4`` (magnitude
2:4 shared by blocks of 4 output channels).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch
from torch import nn

from semisparse import deploy, sparsify
from semisparse.cli.bench_common import srigl_like_masks
from semisparse.models import create_model
from semisparse.runtime.cpu.layers import SparseConv, SparseLinear, deployed_layers
from semisparse.runtime.timing import interleaved_medians


def interleaved(fns, reps, warmup=3):
    """Medians of ``fns`` called in turn, in a fixed order (no time budget)."""
    return interleaved_medians(fns, reps, warmup=warmup, budget_s=float("inf"), shuffle=False)


def ort_layer(mod, x, threads):
    """One layer in onnxruntime, spinning off (its idle threads would hold the CPUs)."""
    import tempfile

    import onnxruntime as ort

    from semisparse.io.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.onnx")
        export_onnx(mod, path, x, dynamic_batch=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed)


def build(name: str, pattern: str, sparsity: float):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    if pattern in ("2:4", "2:4-rows4"):
        sparsify(model, "2:4", shared_rows=4 if pattern == "2:4-rows4" else 1)
    else:
        sparsify(model, None, masks=srigl_like_masks(model, sparsity, 0.1))
    return model, x


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--pattern", default="fan-in")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--plan", default="measure")
    p.add_argument("--ort", action="store_true")
    p.add_argument("--save", default=None, help="torch.save the deployed model and inputs here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, x = build(args.model, args.pattern, args.sparsity)
    t0 = time.perf_counter()
    dep = deploy(model, example_input=x, plan=args.plan)
    print(f"planned in {time.perf_counter() - t0:.1f} s; load {os.getloadavg()}", flush=True)
    layers = deployed_layers(dep)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach().clone()))
             for n, m in layers]
    with torch.no_grad():
        dep(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        t_model = interleaved([lambda: dep(x)], args.reps)[0]
    rows = []
    for n, m in layers:
        xi = inputs[n]
        if isinstance(m, SparseConv):
            w = m._dense_now().float()
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                             m.groups, bias=m.bias is not None).eval()
            with torch.no_grad():
                conv.weight.copy_(w)
                if m.bias is not None:
                    conv.bias.copy_(m.bias)
            conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
            xcl = xi.contiguous(memory_format=torch.channels_last)
            dense_fns = [lambda c=conv, v=xi: c(v), lambda c=conv_cl, v=xcl: c(v)]
            shape = f"conv {m.in_channels}->{m.out_channels} k{m.kernel_size[0]} s{m.stride[0]} {tuple(xi.shape[2:])}"
        elif isinstance(m, SparseLinear):
            w = m._dense_now().float()
            conv = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None).eval()
            with torch.no_grad():
                conv.weight.copy_(w)
                if m.bias is not None:
                    conv.bias.copy_(m.bias)
            dense_fns = [lambda c=conv, v=xi: c(v)] * 2
            shape = f"linear {m.in_features}->{m.out_features} {tuple(xi.shape)}"
        else:
            continue
        fns = [lambda m=m, v=xi: m(v), *dense_fns]
        with torch.no_grad():
            ts = interleaved(fns, args.reps)
            if args.ort:  # alone, in a block: onnxruntime's spinning threads would slow the next call
                sess_fn = ort_layer(conv, xi, args.threads)
                ts.append(interleaved([sess_fn], args.reps)[0])
                ts[0] = min(ts[0], interleaved([lambda m=m, v=xi: m(v)], args.reps)[0])
        kept = m.values.numel()  # kept weights
        positions = math.prod(m(xi).shape[2:]) if isinstance(m, SparseConv) else xi.numel() // xi.shape[-1]
        macs = kept * positions
        dense_macs = math.prod(m.shape) * positions
        rows.append(dict(layer=n, shape=shape, kernel=m.kernel_name(), k=m.values.shape[1], ms=ts[0] * 1e3,
                         nchw=ts[1] * 1e3, cl=ts[2] * 1e3, ort=ts[3] * 1e3 if len(ts) > 3 else float("nan"),
                         gflops=2 * macs / ts[0] / 1e9, dense_gflops=2 * dense_macs / min(ts[1:]) / 1e9))
    tot = sum(r["ms"] for r in rows)
    print(f"model {args.model} {args.pattern}: whole model {t_model * 1e3:.2f} ms, sum of sparse layers alone "
          f"{tot:.2f} ms, sum of best dense {sum(min(r['nchw'], r['cl'], r['ort']) for r in rows):.2f} ms; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'layer':28s} {'shape':40s} {'kernel':26s} {'k':>5s} {'ss ms':>7s} {'nchw':>7s} {'cl':>7s} {'ort':>7s} "
          f"{'ss/best':>7s} {'ssGF/s':>7s} {'dnGF/s':>7s}")
    for r in rows:
        best = min(r["nchw"], r["cl"], r["ort"])
        print(f"{r['layer'][:28]:28s} {r['shape'][:40]:40s} {r['kernel'][:26]:26s} {r['k']:5d} {r['ms']:7.3f} "
              f"{r['nchw']:7.3f} {r['cl']:7.3f} {r['ort']:7.3f} {best / r['ms']:7.2f} {r['gflops']:7.1f} "
              f"{r['dense_gflops']:7.1f}")
    if args.save:
        torch.save({"rows": rows, "t_model": t_model}, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
