"""GPU probe: masks on CUDA models, and PyTorch's 2:4 semi-structured GEMM vs dense (bf16).

Exploratory groundwork for the GPU targets of DESIGN.md (no GPU issue yet). Prints a table; `--json PATH`
writes the numbers. Timing: CUDA events, warm-up first, median of `--reps` runs, several input sets
rotated so the L2 cache does not hold them.

    PYTHONPATH=src python3 benchmarks/gpu_probe.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial

import torch
import torch.nn.functional as F
import torchvision

import semisparse as ss


def cuda_median_ms(fn, reps: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rotating(inputs: list[torch.Tensor], weight: torch.Tensor):
    """A call of ``F.linear`` on the next of several inputs, so repeated runs do not all hit the L2 cache."""
    state = {"i": 0}

    def run():
        state["i"] = (state["i"] + 1) % len(inputs)
        return F.linear(inputs[state["i"]], weight)

    return run


def gemm_rows(reps: int) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    shapes = [(3072, 768), (768, 3072), (2304, 768), (768, 768)]  # ViT-B/16 MLP fc1, fc2, QKV, out-proj
    for tokens in (197, 256 * 197, 4096, 16384):
        for out_f, in_f in shapes:
            lin = torch.nn.Linear(in_f, out_f, bias=False).cuda().to(torch.bfloat16)
            ss.sparsify(lin, "2:4")
            w = lin.weight.detach().clone()
            ws = to_sparse_semi_structured(w)
            xs = [torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
            ref = F.linear(xs[0].float(), w.float())
            got = F.linear(xs[0], ws).float()
            rel = float((got - ref).norm() / ref.norm())
            d, s = cuda_median_ms(rotating(xs, w), reps), cuda_median_ms(rotating(xs, ws), reps)
            rows.append({"tokens": tokens, "out": out_f, "in": in_f, "dense_ms": d, "sparse_ms": s,
                         "speedup": d / s, "rel_err": rel})
    return rows


def vit_rows(reps: int) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for batch in (1, 64, 256):
        model = torchvision.models.vit_b_16(weights=None).cuda().to(torch.bfloat16).eval()
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
        ss.sparsify(model, "2:4")
        ss.finalize(model)
        with torch.inference_mode():
            dense_ms = cuda_median_ms(partial(model, x), reps=max(5, reps // 5))
            ref = model(x).float()
            swapped = 0
            for mod in model.modules():
                if (
                    isinstance(mod, torch.nn.Linear)
                    and not isinstance(mod, torch.nn.modules.linear.NonDynamicallyQuantizableLinear)
                    and mod.weight.shape[0] % 64 == 0
                ):
                    mod.weight = torch.nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
                    swapped += 1
            sparse_ms = cuda_median_ms(partial(model, x), reps=max(5, reps // 5))
            got = model(x).float()
        rows.append({"batch": batch, "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                     "linears_2to4": swapped, "rel_err": float((got - ref).norm() / ref.norm())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json")
    ap.add_argument("--backend", choices=["default", "cutlass"], default="default",
                    help="torch's semi-structured backend: cuSPARSELt when present (default) or CUTLASS")
    args = ap.parse_args()
    if args.backend == "cutlass":
        from torch.sparse import SparseSemiStructuredTensor

        SparseSemiStructuredTensor._FORCE_CUTLASS = True
    torch.manual_seed(0)
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "backend": args.backend}
    print(info)
    # masks on CUDA models
    for name in ("resnet50", "vit_b_16"):
        m = getattr(torchvision.models, name)(weights=None).cuda()
        ss.sparsify(m, "2:4")
        ss.check(m)
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            m(torch.randn(2, 3, 224, 224, device="cuda"))
        print(f"{name}: sparsified {len(ss.masks(m))} weights on CUDA, check ok, forward ok")
    result = {"info": info, "gemm": [], "vit_b_16": []}
    for key, fn in (("gemm", gemm_rows), ("vit_b_16", vit_rows)):
        try:
            result[key] = fn(args.reps)
        except Exception as exc:  # a probe: record what failed and go on
            print(f"{key} failed: {type(exc).__name__}: {exc}")
    print(f"{'tokens':>7} {'out':>5} {'in':>5} {'dense ms':>9} {'2:4 ms':>8} {'ratio':>6} {'rel err':>8}")
    for r in result["gemm"]:
        print(f"{r['tokens']:>7} {r['out']:>5} {r['in']:>5} {r['dense_ms']:>9.4f} {r['sparse_ms']:>8.4f} "
              f"{r['speedup']:>6.2f} {r['rel_err']:>8.1e}")
    print(f"{'ViT-B/16 batch':>14} {'dense ms':>9} {'2:4 ms':>8} {'ratio':>6} {'rel err':>8}")
    for r in result["vit_b_16"]:
        print(f"{r['batch']:>14} {r['dense_ms']:>9.3f} {r['sparse_ms']:>8.3f} {r['speedup']:>6.2f} "
              f"{r['rel_err']:>8.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
