"""ss.deploy against the dense CPU runtimes a user would pick: torch eager (NCHW and channels-last), onnxruntime,
OpenVINO (its default precision and f32), all on the same masked model, timed call by call interleaved in one
process (``semisparse bench``, :mod:`semisparse.cli.anchors`).

Runs ResNet-50, ViT-B/16 and ConvNeXt-T at 90% SRigL-like constant fan-in and at 2:4, at the batch sizes given,
and prints the machine (CPU model, cores, threads), the load before and after, every runtime's time, the ratios
and the flags (``!`` above the byte/FLOP limit, ``~`` other processes held the CPUs), then a Markdown table for
BENCHMARKS.md. Needs the ``bench`` extra (onnx, onnxscript, onnxruntime, openvino); a runtime that is missing is
skipped with a note.

    PYTHONPATH=src python benchmarks/cpu_anchors.py --threads 2 --batch 1 32 --json benchmarks/results/cpu_anchors.json
    PYTHONPATH=src python benchmarks/cpu_anchors.py --smoke       # a minute: resnet18 at 64x64, 3 reps
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from semisparse.cli import bench

MODELS = ("resnet50", "vit_b_16", "convnext_tiny")


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return bench.machine()["cpu"]
    flags = ""
    for line in out.splitlines():
        if line.startswith("Flags:"):
            have = set(line.split(":", 1)[1].split())
            flags = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in have)
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    return f"{name} ({flags})"


def _alone(r: dict, bf16: bool = False) -> str:
    """The ratio of the deployed model (fp32, or ``bf16``) to the fastest dense runtime of the same precision
    when each ran alone, back to back (no pool hand-over)."""
    b = r.get("blocked_ms")
    mine = "deployed bf16" if bf16 else "deployed"
    if not b or mine not in b:
        return "-"
    want = "bf16" if bf16 else "fp32"
    dense = [(t, n) for n, t in b.items() if r.get("dense_runtimes_precision", {}).get(n) == want]
    if not dense:
        return "-"
    t, name = min(dense)
    return f"{t / b[mine]:.2f}x ({name})"


def markdown(rows: list[dict], info: dict) -> str:
    names: list[str] = []
    for r in rows:
        names += [n for n in r["dense_runtimes_ms"] if n not in names]
    bf16 = any("deployed_bf16_ms" in r for r in rows)
    head = ["model", "pattern", "batch", "ss.deploy ms", *(["ss.deploy bf16 ms"] if bf16 else []),
            *[f"{n} ms" for n in names], "vs fastest dense (fp32)", "vs torch eager", "vs fastest dense, each alone",
            *(["bf16 vs fastest bf16 dense", "bf16, each alone"] if bf16 else []), "others busy (CPUs)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pattern = r["masks"] if r["masks"].startswith("2:4") else f"fan-in {r['sparsity']:g} ({r['masks']})"
        fast, fast16 = r["ratio_vs_fastest_dense"], r.get("ratio_bf16_vs_fastest_bf16_dense")
        r16 = ([f"{fast16:.2f}x{bench.marks(r, fast16)} ({r['fastest_bf16_dense']})", _alone(r, bf16=True)]
               if "deployed_bf16_ms" in r else ["-", "-"]) if bf16 else []
        cells = [r["model"], pattern, str(r["batch"]), f"{r['deployed_ms']:.1f}",
                 *([f"{r['deployed_bf16_ms']:.1f}" if "deployed_bf16_ms" in r else "-"] if bf16 else []),
                 *[f"{r['dense_runtimes_ms'][n]:.1f}" if n in r["dense_runtimes_ms"] else "-" for n in names],
                 f"{fast:.2f}x{bench.marks(r, fast)} ({r['fastest_dense']})",
                 f"{r['ratio']:.2f}x{bench.marks(r)}", _alone(r), *r16, str(r.get("others_busy_cpus"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{info['cpu_model']}, {info['threads']} threads, {'fp32 and bf16' if bf16 else 'fp32'}, torch "
                 f"{info['torch']}; load avg {info['load_before']} before, {info['load_after']} after, on "
                 f"{info['cpus_available']} CPUs")
    lines += bench.footnotes(rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--batch", type=int, nargs="*", default=[1])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=40, help="interleaved repetitions (median) at batch 1")
    p.add_argument("--reps-batched", type=int, default=12, help="interleaved repetitions at batch > 1")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--patterns", nargs="*", choices=("fan-in", "2:4", "2:4-rows4"), default=["fan-in", "2:4"],
                   help="2:4-rows4: 2:4 chosen per block of 4 output channels (ss.sparsify(shared_rows=4))")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--bf16", action="store_true",
                   help="also ss.deploy(dtype=torch.bfloat16) against the bf16 dense runtimes (torch bf16 autocast, "
                        "OpenVINO's default where it is bf16)")
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="resnet18 at 64x64, 3 reps: checks the pipeline only")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.image_size, args.reps, args.batch = ["resnet18"], 64, 6, [1]
    torch.set_num_threads(args.threads)
    info = bench.machine()
    info.update(cpu_model=lscpu_model(), load_before=round(os.getloadavg()[0], 2))
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, {info['cpus_available']} available, threads "
          f"{args.threads}, torch {info['torch']}, kernels {'on' if info['kernels'] else 'OFF'} "
          f"(SIMD {info['simd_bits']} bit), load avg {info['load_before']}", flush=True)
    rows = []
    for name in args.models:
        for pattern in args.patterns:
            for b in args.batch:
                reps = args.reps if b == 1 else args.reps_batched
                row = bench.bench_model(name, args.sparsity, b, reps, "srigl", 0.1, args.image_size, pattern,
                                        blocked_too=True, bf16=args.bf16)
                rows.append(row)
                print(bench.format_table([row]), flush=True)
                print(f"  planned in {row['plan_s']} s; max rel err deployed {row['max_rel_err']:.2e}, runtimes "
                      + ", ".join(f"{n} {e:.1e}" for n, e in row["dense_runtimes_rel_err"].items())
                      + f"; load avg now {os.getloadavg()[0]:.2f}", flush=True)
                alone = ", ".join(f"{n} {t:.2f}" for n, t in row["blocked_ms"].items())
                print(f"  each alone, back to back (ms): {alone}", flush=True)
    info["load_after"] = round(os.getloadavg()[0], 2)
    print()
    print(bench.format_table(rows))
    print()
    print(markdown(rows, info))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "results": rows}, fh, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
