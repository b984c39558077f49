"""Condensed constant fan-in Triton kernels against dense ``nn.Linear`` on a GPU (DESIGN.md's condensed targets).

One run, in this order, each part under its own time cap and all under ``--budget-s``:

1. correctness on the device: every planner config on small Linear / 1x1-conv shapes (fp32, bf16) against
   the masked dense layer in float64;
2. Linear 3072->768 (constant fan-in, no ablated neurons) in priority order: fp32 90% batch 256, 1;
   bf16 90% batch 256; fp32 90% batch 32, 4096; bf16 90% batch 1, 32, 4096; then 80% likewise. Each part
   checks every config's output, then times dense ``nn.Linear`` (same dtype; fp32 also with TF32 as an
   aside) and every config, each captured in its own CUDA graph, replayed ``--inner`` times between two
   CUDA events, ``--reps`` samples taken round-robin in a shuffled order, medians reported;
3. a ResNet-50-like 1x1 conv (256->64, 56x56, channels-last, fp32 90%, batch 1 and 32).

Results go to ``--out`` or ``$OUT/gpu_condensed.json`` (rewritten after every part, so a run cut short
keeps what it measured) and a table to stdout. ``--smoke`` runs the same logic on CPU under the Triton
interpreter with tiny shapes and wall-clock timing (no graphs): a check of the script, not a measurement.

    PYTHONPATH=src python benchmarks/gpu_condensed.py                 # GPU (H100/H200)
    PYTHONPATH=src python benchmarks/gpu_condensed.py --smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be on before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from semisparse.runtime.cuda import kernels as tc  # noqa: E402


def fan_in_mask(out_f: int, in_f: int, k: int, seed: int, device) -> torch.Tensor:
    """Constant fan-in ``k``: random kept columns per row."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.rand(out_f, in_f, generator=g).argsort(1)[:, :k]
    return torch.zeros(out_f, in_f, dtype=torch.bool).scatter_(1, cols, True).to(device)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the output's scale."""
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


class Timer:
    """CUDA graphs + events on a GPU; plain calls + wall clock in smoke mode."""

    def __init__(self, smoke: bool, reps: int, inner: int) -> None:
        self.smoke, self.reps, self.inner = smoke, reps, inner

    def prepare(self, fn):
        """A callable that reruns ``fn`` (a CUDA graph replay on the GPU)."""
        if self.smoke:
            fn()
            return fn
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles here) outside the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        return g.replay

    def medians_us(self, runs: list) -> list[float]:
        """Median microseconds per call of each of ``runs``, sampled round-robin in a shuffled order."""
        samples: list[list[float]] = [[] for _ in runs]
        order = list(range(len(runs)))
        rng = random.Random(0)
        for run in runs:  # one warm pass
            run()
        for _ in range(self.reps):
            rng.shuffle(order)
            if self.smoke:
                for i in order:
                    t = time.perf_counter()
                    for _ in range(self.inner):
                        runs[i]()
                    samples[i].append((time.perf_counter() - t) * 1e6 / self.inner)
                continue
            events = []
            for i in order:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(self.inner):
                    runs[i]()
                b.record()
                events.append((i, a, b))
            torch.cuda.synchronize()
            for i, a, b in events:
                samples[i].append(a.elapsed_time(b) * 1e3 / self.inner)
        return [statistics.median(s) for s in samples]


def correctness(dev: str, smoke: bool, cap_s: float) -> list[dict]:
    """Every planner config on small shapes (incl. ablated neurons, split-k, 1x1 conv both formats); stops
    starting new shapes after ``cap_s`` seconds (the timed parts check their own configs too)."""
    rows = []
    start = time.perf_counter()
    shapes = [(40, 96, 13, b) for b in (1, 5, 70)] if smoke else [(200, 700, 70, b) for b in (1, 7, 33, 300)]
    for dtype in (torch.float32, torch.bfloat16):
        for out_f, in_f, k, batch in shapes:
            if time.perf_counter() - start > cap_s:
                rows.append({"kind": f"linear {out_f}x{in_f}", "dtype": str(dtype)[6:], "positions": batch,
                             "ok": None, "skipped": "correctness time cap"})
                continue
            torch.manual_seed(batch)
            lin = nn.Linear(in_f, out_f).to(dev)
            m = fan_in_mask(out_f, in_f, k, batch, dev)
            m[::17] = False  # some ablated neurons
            layer = tc.build(lin, m).to(dtype)
            x = torch.randn(batch, in_f, device=dev).to(dtype)
            ref = F.linear(x.double(), (lin.weight * m).to(dtype).double(), lin.bias.to(dtype).double())
            rows += [check(f"linear {out_f}x{in_f}", layer, cfg, x, ref) for cfg in layer.configs(x)]
        conv = nn.Conv2d(64, 32, 1).to(dev)
        m = fan_in_mask(32, 64, 7, 1, dev).view(32, 64, 1, 1)
        layer = tc.build(conv, m).to(dtype)
        for cl in (True, False):
            x = torch.randn(2, 64, 5, 6, device=dev).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last) if cl else x
            ref = F.conv2d(x.double(), (conv.weight * m).to(dtype).double(), conv.bias.to(dtype).double())
            kind = "conv1x1 " + ("channels-last" if cl else "nchw")
            rows += [check(kind, layer, cfg, x, ref) for cfg in layer.configs(x)[:3]]
    return rows


def check(kind: str, layer: nn.Module, cfg, x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Run ``layer`` with ``cfg`` on ``x`` and compare with ``ref``; a config that fails is recorded."""
    row = {"kind": kind, "dtype": str(x.dtype)[6:], "positions": ref.numel() // ref.shape[-1], "config": cfg.name}
    try:
        layer.use_config(cfg)
        with torch.no_grad():
            err = rel_err(layer(x), ref)
        row.update(rel_err=err, ok=err <= TOL[x.dtype])
    except Exception as exc:  # does not compile or run: recorded, not fatal
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
    return row


def with_tf32(on: bool, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with TF32 allowed or not for matmuls and cuDNN convs (captured that way in a graph),
    the flags restored after."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        return module(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def time_part(part: dict, timer: Timer, dense: nn.Module, layer: nn.Module, x: torch.Tensor, ref: torch.Tensor,
              cap_s: float, start: float) -> dict:
    """Check every config of ``layer`` on ``x``, then time dense (TF32 off; fp32 also with TF32 on, an aside)
    and each config."""
    names, runs = ["dense"], []
    part["configs"] = []
    with torch.no_grad():
        runs.append(timer.prepare(lambda: with_tf32(False, dense, x)))  # the baseline: true fp32 (and bf16)
        if x.dtype == torch.float32 and not timer.smoke:
            names.append("dense-tf32")  # an aside: fp32 dense on tensor cores (TF32 rounding of the inputs)
            runs.append(timer.prepare(lambda: with_tf32(True, dense, x)))
        for cfg in layer.configs(x):
            if time.perf_counter() - start > cap_s / 2:  # keep half the cap for timing
                part["configs"].append({"config": cfg.name, "skipped": "part time cap"})
                continue
            row = check(part["kind"], layer, cfg, x, ref)
            row = {"config": cfg.name, **{k: v for k, v in row.items() if k in ("rel_err", "ok", "error")}}
            part["configs"].append(row)
            if not row["ok"]:
                continue
            try:
                runs.append(timer.prepare(lambda c=cfg: (layer.use_config(c), layer(x))[1]))
                names.append(cfg.name)
            except Exception as exc:
                row.update(ok=False, error=f"graph: {type(exc).__name__}: {exc}"[:500])
        us = timer.medians_us(runs)
    times = dict(zip(names, us))
    part["dense_us"] = times.pop("dense")
    if "dense-tf32" in times:
        part["dense_tf32_us"] = times.pop("dense-tf32")
    for row in part["configs"]:
        if row["config"] in times:
            row["us"] = times[row["config"]]
            row["ratio"] = part["dense_us"] / row["us"]
    timed = [r for r in part["configs"] if "us" in r]
    if timed:
        best = min(timed, key=lambda r: r["us"])
        part.update(best_config=best["config"], best_us=best["us"], best_ratio=best["ratio"])
    part["seconds"] = time.perf_counter() - start
    return part


def linear_part(dev, timer, dtype, sparsity, batch, in_f, out_f, cap_s) -> dict:
    """One Linear case: every config against dense ``nn.Linear`` of the same dtype."""
    start = time.perf_counter()
    torch.manual_seed(0)
    k = round(in_f * (1 - sparsity))
    lin = nn.Linear(in_f, out_f).to(dev)
    m = fan_in_mask(out_f, in_f, k, 0, dev)
    with torch.no_grad():
        lin.weight.mul_(m)
    layer = tc.build(lin, m).to(dtype)
    dense = lin.to(dtype)
    x = torch.randn(batch, in_f, device=dev).to(dtype)
    with torch.no_grad():
        ref = F.linear(x.double(), dense.weight.double(), dense.bias.double())
    part = {"kind": "linear", "dtype": str(dtype)[6:], "sparsity": sparsity, "batch": batch, "in": in_f,
            "out": out_f, "fan_in": k}
    return time_part(part, timer, dense, layer, x, ref, cap_s, start)


def conv_part(dev, timer, dtype, sparsity, batch, cin, cout, hw, cap_s) -> dict:
    """One 1x1 conv case on channels-last input: every config against dense ``nn.Conv2d`` (same format)."""
    start = time.perf_counter()
    torch.manual_seed(0)
    k = round(cin * (1 - sparsity))
    conv = nn.Conv2d(cin, cout, 1).to(dev)
    m = fan_in_mask(cout, cin, k, 0, dev).view(cout, cin, 1, 1)
    with torch.no_grad():
        conv.weight.mul_(m)
    layer = tc.build(conv, m).to(dtype)
    dense = conv.to(dtype).to(memory_format=torch.channels_last)
    x = torch.randn(batch, cin, hw, hw, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = F.conv2d(x.double(), dense.weight.double(), dense.bias.double())
    part = {"kind": "conv1x1-channels-last", "dtype": str(dtype)[6:], "sparsity": sparsity, "batch": batch,
            "in": cin, "out": cout, "hw": hw, "fan_in": k}
    return time_part(part, timer, dense, layer, x, ref, cap_s, start)


def plan(smoke: bool) -> list[tuple]:
    """The parts in priority order: (kind, dtype, sparsity, batch, shape...)."""
    if smoke:
        lin = (96, 32)
        return [("linear", torch.float32, 0.9, 8, *lin), ("linear", torch.float32, 0.9, 1, *lin),
                ("linear", torch.bfloat16, 0.9, 8, *lin), ("linear", torch.float32, 0.8, 3, *lin),
                ("conv", torch.float32, 0.9, 1, 32, 16, 3)]
    lin = (3072, 768)
    out = [("linear", torch.float32, 0.9, 256, *lin), ("linear", torch.float32, 0.9, 1, *lin),
           ("linear", torch.bfloat16, 0.9, 256, *lin), ("linear", torch.float32, 0.9, 32, *lin),
           ("linear", torch.float32, 0.9, 4096, *lin)]
    out += [("linear", torch.bfloat16, 0.9, b, *lin) for b in (1, 32, 4096)]
    out += [("linear", torch.float32, 0.8, b, *lin) for b in (256, 1, 32, 4096)]
    out += [("linear", torch.bfloat16, 0.8, b, *lin) for b in (256, 1, 32, 4096)]
    out += [("conv", torch.float32, 0.9, b, 256, 64, 56) for b in (1, 32)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: checks the script")
    ap.add_argument("--out", help="JSON path (default $OUT/gpu_condensed.json, else ./gpu_condensed.json)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new parts after this many seconds")
    ap.add_argument("--part-cap-s", type=float, default=45.0, help="time cap of one part (half for compiling)")
    ap.add_argument("--correctness-cap-s", type=float, default=90.0, help="time cap of the small-shape checks")
    ap.add_argument("--reps", type=int, default=None, help="timing samples per candidate (default 30; smoke 2)")
    ap.add_argument("--inner", type=int, default=None, help="graph replays per sample (default 20; smoke 1)")
    args = ap.parse_args()
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "gpu_condensed.json")
    if not args.smoke and not tc.available():
        sys.exit("gpu_condensed: needs triton and a CUDA device (or --smoke for the CPU interpreter check)")
    dev = "cpu" if args.smoke else "cuda"
    timer = Timer(args.smoke, args.reps or (2 if args.smoke else 30), args.inner or (1 if args.smoke else 20))
    t0 = time.perf_counter()
    import triton

    result = {"meta": {"device": "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name(),
                       "torch": torch.__version__, "triton": triton.__version__, "smoke": args.smoke,
                       "reps": timer.reps, "inner": timer.inner, "graphs": not args.smoke,
                       "dense_baseline": "same dtype, TF32 off (dense_tf32_us: fp32 with TF32 on, an aside)"},
              "correctness": [], "parts": [], "not_run": []}

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, out_path)

    result["correctness"] = correctness(dev, args.smoke, args.correctness_cap_s)
    checked = [r for r in result["correctness"] if r["ok"] is not None]
    bad = [r for r in checked if not r["ok"]]
    print(f"correctness: {len(checked) - len(bad)}/{len(checked)} ok, {len(result['correctness']) - len(checked)} "
          f"shapes past the cap ({time.perf_counter() - t0:.0f}s)")
    for r in bad[:10]:
        print("  FAIL", r)
    save()
    print(f"{'part':<36} {'dense us':>9} {'best us':>9} {'ratio':>6}  best config")
    for kind, dtype, sparsity, batch, *shape in plan(args.smoke):
        label = f"{kind} {str(dtype)[6:]} {sparsity:.0%} b{batch} {'x'.join(map(str, shape))}"
        if time.perf_counter() - t0 > args.budget_s:
            result["not_run"].append(label)
            continue
        try:
            if kind == "linear":
                part = linear_part(dev, timer, dtype, sparsity, batch, *shape, args.part_cap_s)
            else:
                part = conv_part(dev, timer, dtype, sparsity, batch, *shape, args.part_cap_s)
        except Exception as exc:  # record and go on to the next part
            part = {"label": label, "error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{label:<36} ERROR {part['error']}")
        else:
            extra = f"  (dense tf32 {part['dense_tf32_us']:.1f} us)" if "dense_tf32_us" in part else ""
            print(f"{label:<36} {part['dense_us']:>9.1f} {part.get('best_us', float('nan')):>9.1f} "
                  f"{part.get('best_ratio', float('nan')):>6.2f}  {part.get('best_config', '-')}{extra}")
        result["parts"].append(part)
        save()
    result["meta"]["seconds"] = time.perf_counter() - t0
    save()
    print(f"wrote {out_path} ({result['meta']['seconds']:.0f}s; not run: {len(result['not_run'])})")


if __name__ == "__main__":
    main()
