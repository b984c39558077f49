"""File size of compressed checkpoints (``ss.save``) against the dense safetensors file, and save/load time.

    python benchmarks/checkpoint_size.py [--models resnet50 vit_b_16] [--out benchmarks/results/checkpoint.md]

For each model (torchvision, ``weights=None``: sizes do not depend on the values): the dense file in fp32
and fp16 (``safetensors.torch.save_file`` of the plain state_dict), the "dense + bool masks" file that a
masked state_dict amounts to, and ``ss.save`` at 2:4 (fp16 and fp32) and at 90% constant fan-in (fp32 and
fp16). Every compressed file is loaded back and compared with the saved model (masks and effective weights).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file

import semisparse as ss

TARGETS = {("2:4", "float16"): 0.6, ("fan-in 0.9", "float32"): 0.2}


def dense_file(model: torch.nn.Module, path: Path, dtype: torch.dtype, with_masks: bool = False) -> int:
    sd = {
        k: v.detach().to(dtype) if v.is_floating_point() else v.detach()
        for k, v in model.state_dict().items()
    }
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(path))
    return path.stat().st_size


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def same(a: torch.nn.Module, b: torch.nn.Module, dtype: torch.dtype) -> bool:
    ma, mb = ss.masks(a), ss.masks(b)
    if ma.keys() != mb.keys() or not all(torch.equal(ma[k], mb[k]) for k in ma):
        return False
    ss.check(b)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if k.endswith(".mask"):
            continue
        ref = sa[k]
        if k.endswith(".original"):
            ref = ref * ma[k.replace(".parametrizations.", ".").removesuffix(".original")]
        if ref.is_floating_point():
            ref = ref.to(dtype).to(ref.dtype)
        if not torch.equal(ref, sb[k]):
            return False
    return True


def measure(name: str, tmp: Path) -> list[dict]:
    build = lambda: torchvision.models.get_model(name, weights=None)  # noqa: E731
    torch.manual_seed(0)
    model = build()
    rows = []
    d32 = dense_file(model, tmp / "d32.safetensors", torch.float32)
    d16 = dense_file(model, tmp / "d16.safetensors", torch.float16)
    for pattern, label in (("2:4", "2:4"), (0.9, "fan-in 0.9")):
        ss.sparsify(model, pattern, overwrite=True)
        rep = ss.report(model)
        masked = dense_file(model, tmp / "masked.safetensors", torch.float32)  # original + bool mask buffers
        for dtype, dense in ((torch.float16, d16), (torch.float32, d32)):
            path = tmp / "c.safetensors"
            t_save, _ = timed(lambda path=path, dtype=dtype: ss.save(model, path, dtype=dtype))
            size = path.stat().st_size
            t_load, loaded = timed(lambda path=path: ss.load(path, model=build()))
            dname = str(dtype).removeprefix("torch.")
            rows.append(
                {
                    "model": name,
                    "pattern": label,
                    "dtype": dname,
                    "dense_bytes": dense,
                    "file_bytes": size,
                    "ratio": size / dense,
                    "masked_fp32_bytes": masked,
                    "param_share": rep.param_share,
                    "save_s": t_save,
                    "load_s": t_load,
                    "exact": same(model, loaded, dtype),
                    "target": TARGETS.get((label, dname)),
                }
            )
            print(rows[-1], flush=True)
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def to_markdown(rows: list[dict], threads: int) -> str:
    lines = [
        "# Compressed checkpoint size (`ss.save`)",
        "",
        f"Machine: {cpu_name()} ({os.cpu_count()} cores visible, "
        f"{threads} torch threads), torch {torch.__version__}, Python {platform.python_version()}. "
        "Produced by `python benchmarks/checkpoint_size.py`.",
        "",
        "Dense = `safetensors.torch.save_file` of the plain state_dict in the same dtype (the reference the "
        "targets name). Masked = the fp32 state_dict of the sparsified model (dense weight + bool mask per "
        "sparse layer), what a checkpoint holds without compression. Sparse layers: every eligible Linear, "
        "Conv and MHA projection (`ss.sparsify(m, '2:4')`: the 3-channel stem/patch conv stays dense; "
        "`ss.sparsify(m, 0.9)`: constant fan-in 10% per neuron, every layer). Times: medians of 3 on a "
        "machine shared with other jobs; load = `ss.load(path, model=<fresh torchvision model>)` including "
        "building that model, checking the digest and every index.",
        "",
        "| model | sparsity | dtype | sparse params | dense file | masked fp32 | compressed | ratio | target "
        "| save s | load s | exact round trip |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tgt = f"<= {r['target']}" if r["target"] else ""
        ok = " (met)" if r["target"] and r["ratio"] <= r["target"] else (" (MISSED)" if r["target"] else "")
        lines.append(
            f"| {r['model']} | {r['pattern']} | {r['dtype']} | {r['param_share']:.1%} | "
            f"{r['dense_bytes'] / 1e6:.1f} MB | {r['masked_fp32_bytes'] / 1e6:.1f} MB | "
            f"{r['file_bytes'] / 1e6:.1f} MB | "
            f"**{r['ratio']:.3f}x** | {tgt}{ok} | {r['save_s']:.2f} | {r['load_s']:.2f} | {r['exact']} |"
        )
    lines += [
        "",
        "Limits, per kept value: 2:4 stores the value plus 2 bits of in-group index (fp16: 2.25 bytes per 2 "
        "dense weights -> 0.5625x of the sparse layers); constant fan-in stores the value plus an int16 "
        "column index (fp32 at 10% density: 0.1 x 6 / 4 = 0.15x). The rest of each ratio is the dense "
        "remainder (BatchNorm, biases, embeddings, the dense stem) and the header.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/checkpoint.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            rows += measure(name, Path(d))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(to_markdown(rows, args.threads))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
