"""``semisparse bench``: dense vs condensed speed on this machine, per layer and per whole model.

Layer rows (``--layer OUTxIN``, default the ViT-B/16 MLP ``768x3072``) time the masked dense
``nn.Linear``, the deployed condensed layer and the same weight through torch CSR (``to_sparse_csr``), all
in one process, medians over ``--reps`` runs, and give the limits: the byte ratio (dense weight bytes over
values + indices: the bound on the speed-up of a memory-bound batch-1 layer) and the FLOP ratio
(1 / density: the bound of a compute-bound one). Model rows (``--model``) deploy a whole torchvision /
registry model at ``--sparsity`` (uniform constant fan-in, or ``--masks srigl``: ERK fan-in budgets and
ablated neurons, SRigL's structure) and time it against the dense model, with the share of the sparse
MACs that ran in condensed kernels.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
import warnings

import torch
from torch import nn

from ..errors import SemisparseError
from ..masking import masks as model_masks
from ..masking import report, sparsify
from ..masking.parametrization import detached_copy, sparse_weights
from ..models import create_model
from ..runtime import default_example_input, deploy, deployed_layers
from ..runtime.cpu import cpus, kernels
from ..runtime.fold import fold_batchnorm
from ..runtime.timing import blocked_medians, interleaved_medians
from .anchors import dense_anchors, torch_bf16_autocast, torch_channels_last, torch_eager
from .bench_common import finish, srigl_like_masks, table


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semisparse bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", nargs="*", default=None, metavar="OUTxIN",
                   help="Linear layer shapes to time (default 768x3072 when no --model is given)")
    p.add_argument("--model", nargs="*", default=None, metavar="NAME",
                   help="whole models to time, e.g. resnet50 vit_b_16 (registry names)")
    p.add_argument("--file", nargs="*", default=None, metavar="PATH",
                   help="compressed files (ss.save / semisparse export) to time, deployed, against their dense self")
    p.add_argument("--input-size", type=int, nargs="*", default=None, metavar="N",
                   help="with --file: input size C H W (or H W, or S); default the size the file records")
    p.add_argument("--no-anchors", action="store_true",
                   help="models and files: skip the dense runtimes (onnxruntime, OpenVINO; the 'bench' extra)")
    p.add_argument("--sparsity", type=float, nargs="*", default=None,
                   help="sparsities (default: 0.9 and 0.8 for layers, 0.9 for models)")
    p.add_argument("--batch", type=int, nargs="*", default=None,
                   help="batch sizes (default: 1 and 256 for layers, 1 for models)")
    p.add_argument("--masks", choices=("uniform", "srigl"), default="srigl",
                   help="model masks: uniform constant fan-in, or SRigL's structure (ERK fan-in + ablation)")
    p.add_argument("--ablation", type=float, default=0.1,
                   help="with --masks srigl: share of neurons ablated in every layer but the last")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input size (default: the model's own, 224 for ImageNet models)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the kernels share them)")
    p.add_argument("--reps", type=int, default=50, help="timed repetitions per measurement (median)")
    p.add_argument("--no-csr", action="store_true", help="skip the torch CSR comparison")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--seed", type=int, default=0)
    # --device cuda: 2:4 through cuSPARSELt (semisparse.cli.bench_cuda)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: condensed kernels (constant fan-in); cuda: 2:4 layers through cuSPARSELt")
    p.add_argument("--pattern", default=None, choices=("2:4", "2:4-rows4", "fan-in"),
                   help="models: fan-in (constant fan-in at --sparsity with --masks; CPU default), 2:4 (magnitude "
                        "2:4; --device cuda default: cuSPARSELt) or 2:4-rows4 (2:4 chosen per block of 4 output "
                        "channels, which the CPU runs 4 rows per loaded input)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="cuda: the dtype everything runs in (default bf16); cpu models and files: bf16 also times "
                        "ss.deploy(dtype=torch.bfloat16) against the bf16 dense runtimes (torch bf16 autocast, "
                        "OpenVINO where its default is bf16); fp32 is always timed")
    p.add_argument("--tokens", type=int, nargs="*", default=None,
                   help="with --device cuda: token counts of the layer rows (default 197 3152 12608 50432)")
    p.add_argument("--no-compile", action="store_true",
                   help="with --device cuda: skip the torch.compile(mode='max-autotune') baseline (minutes)")
    return p


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "cpus_available": available_cpus(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "kernels": kernels.available(), "simd_bits": kernels.simd_width(), "load_avg_1min": load,
            "dtype": "float32"}


def bench_linear(out_f: int, in_f: int, sparsity: float, batch: int, reps: int, csr: bool = True) -> dict:
    """One Linear ``in_f -> out_f`` at constant fan-in ``sparsity``: dense, condensed, CSR; limits."""
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    sparsify(lin, sparsity)
    dep = deploy(lin, plan="condensed")
    dense = nn.Linear(in_f, out_f)  # the dense nn.Linear holding the masked weight: module against module
    with torch.no_grad():
        dense.weight.copy_(lin.weight * model_masks(lin)["weight"])
        dense.bias.copy_(lin.bias)
    w, b = dense.weight.detach(), dense.bias.detach()
    x = torch.randn(batch, in_f)
    variants = dep.variants(x)  # the kernel settings deploy's planner chooses from, one module each
    deployed = []
    for v in variants:
        d = copy.deepcopy(dep)
        d.use_variant(v)
        deployed.append(d)
    with torch.no_grad():
        ref = dense(x)
        err = max(float((d(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) for d in deployed)
        fns = [lambda: _fitted(dense, x)] + [lambda d=d: d(x) for d in deployed]
        if csr:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                wc = w.to_sparse_csr()
            fns.append(lambda: torch.addmm(b[:, None], wc, x.t()).t())
        # cold: the candidates take turns call by call (a new random order each round), so each call finds
        # caches the others just used;
        # warm: each runs back to back in blocks, its data stays in cache (how timeit measures a statement)
        before = load_sample()
        cold = [1e3 * t for t in interleaved_medians(fns, reps, warmup=5, budget_s=1e9)]
        warm = [1e3 * t for t in blocked_medians(fns, reps)]
        others = others_busy(before, load_sample())
    nv = len(variants)
    t_dense, t_dense_warm = cold[0], warm[0]
    t_cond, best = min(zip(cold[1:1 + nv], variants), key=lambda tv: tv[0])
    t_cond_warm = min(warm[1:1 + nv])
    t_csr = cold[-1] if csr else None
    k = dep.values.shape[1]
    dense_bytes = out_f * in_f * 4
    cond_bytes = dep.values.numel() * 4 + dep.idx.numel() * dep.idx.element_size()
    return {
        "kind": "layer", "shape": f"Linear {in_f}->{out_f}", "sparsity": sparsity, "k": k, "batch": batch,
        "dense_ms": round(t_dense, 4), "condensed_ms": round(t_cond, 4),
        "ratio": round(t_dense / t_cond, 2), "dense_warm_ms": round(t_dense_warm, 4),
        "condensed_warm_ms": round(t_cond_warm, 4), "ratio_warm": round(t_dense_warm / t_cond_warm, 2),
        "csr_warm_ratio": None if t_csr is None else round(t_dense_warm / warm[-1], 2),
        "csr_ms": None if t_csr is None else round(t_csr, 4),
        "csr_ratio": None if t_csr is None else round(t_dense / t_csr, 2),
        "byte_limit": round(dense_bytes / cond_bytes, 2), "flop_limit": round(in_f / k, 2),
        "condensed_gmacs": round(batch * out_f * k / (t_cond * 1e6), 2),
        "condensed_gbytes_s": round(cond_bytes / (t_cond * 1e6), 2) if batch == 1 else None,
        "dense_gbytes_s": round(dense_bytes / (t_dense * 1e6), 2) if batch == 1 else None,
        "variant": best, "variants_ms": [round(t, 4) for t in cold[1:1 + nv]], "max_rel_err": err,
        # batch 1 moves bytes (the byte ratio bounds it), larger batches compute (the FLOP ratio does)
        "above_limit": t_dense / t_cond > (dense_bytes / cond_bytes if batch == 1 else in_f / k) * 1.02,
        "others_busy_cpus": others, "loaded": loaded(others, torch.get_num_threads()),
    }


def bench_model(name: str, sparsity: float = 0.9, batch: int = 1, reps: int = 20, masks: str = "uniform",
                ablation: float = 0.0, image_size: int | None = None, pattern: str = "fan-in",
                anchors: bool = True, blocked_too: bool = False, bf16: bool = False) -> dict:
    """A whole registry model made sparse here, deployed, against its dense self and the dense runtimes.

    ``pattern``: ``"fan-in"`` at ``sparsity`` with ``masks`` ``"uniform"`` (constant fan-in) or ``"srigl"``
    (:func:`srigl_like_masks` with ``ablation``), or ``"2:4"`` (magnitude 2:4; ``sparsity`` ignored);
    ``"2:4-rows4"``: magnitude 2:4 shared by blocks of 4 output channels (``shared_rows=4``).
    Returns one result row (:func:`bench_sparse`)."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():  # zero-initialised layers (torchvision ViT's head) would make every output 0
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and not mod.weight.any():
                mod.weight.normal_(0.0, 0.02)
    x = default_example_input(model, batch)
    if image_size is not None:
        x = torch.randn(*x.shape[:2], *([image_size] * (x.dim() - 2)))
    if pattern in ("2:4", "2:4-rows4"):
        sparsify(model, "2:4", shared_rows=4 if pattern == "2:4-rows4" else 1)
        masks, sparsity = pattern, 0.5
    elif masks == "srigl":
        sparsify(model, None, masks=srigl_like_masks(model, sparsity, ablation))
    else:
        sparsify(model, sparsity)
    row = bench_sparse(model, x, reps, anchors=anchors, blocked_too=blocked_too, bf16=bf16)
    row.update(model=name, masks=masks, sparsity=sparsity)
    return row


def bench_file(path: str, input_size: list[int] | None = None, batch: int = 1, reps: int = 20,
               anchors: bool = True, bf16: bool = False) -> dict:
    """The model of a compressed file (``ss.load``), deployed, against its dense self and the dense runtimes,
    at ``input_size`` (``[C, H, W]``, or ``[H, W]`` / ``[S]`` for the recorded channels), else the input size
    the file records, else the model's own guess (with a warning)."""
    from ..io.compressed import load

    model = load(path).eval()
    recorded = getattr(model, "semisparse_input_size", None)
    guess = default_example_input(model, batch)
    if input_size:
        size = list(input_size)
        if len(size) == 1:
            size = size * (guess.dim() - 2)
        if len(size) == guess.dim() - 2:
            size = [guess.shape[1], *size]
        x = torch.randn(batch, *size)
    elif recorded:
        x = torch.randn(batch, *recorded)
    else:
        warnings.warn(f"semisparse: {path} records no input size; benchmarking at {tuple(guess.shape[1:])} "
                      "(pass --input-size)", RuntimeWarning, stacklevel=2)
        x = guess
    pats = sorted({sw.parametrization.pattern_name for sw in sparse_weights(model)})
    row = bench_sparse(model, x, reps, anchors=anchors, bf16=bf16)
    arch = getattr(model, "semisparse_arch", None) or {}
    row.update(model=f"{os.path.basename(str(path))} ({arch.get('name', '?')})", masks=",".join(pats),
               sparsity=round(1.0 - row["kept_density"], 3), file=str(path))
    return row


def bench_sparse(model: nn.Module, x: torch.Tensor, reps: int = 20, anchors: bool = True,
                 blocked_too: bool = False, bf16: bool = False) -> dict:
    """A sparsified ``model`` deployed at input ``x`` and timed, call by call interleaved in one process, against
    the same model dense: torch eager (with the deployed model's thread sizing), BatchNorm-folded, the deployed
    model with every layer dense, and (``anchors``) onnxruntime and OpenVINO on the masked model exported to
    ONNX (:mod:`semisparse.cli.anchors`). The first ratio is against the fastest fp32 dense runtime.
    ``blocked_too``: also time the deployed model and each runtime alone, back to back in blocks
    (``blocked_ms``). ``bf16``: also the model deployed with ``dtype=torch.bfloat16`` (fed bf16 inputs), against
    the fastest bf16 dense runtime: torch eager under bf16 autocast, and OpenVINO's default where that is bf16
    (``deployed_bf16_ms``, ``ratio_bf16_vs_fastest_bf16_dense``)."""
    batch = x.shape[0]
    t0 = time.perf_counter()
    dep = deploy(model, batch_size=batch, example_input=x)
    plan_s = time.perf_counter() - t0
    dense = dense_copy(model)
    # The same dense model with BatchNorm folded into its convs, as deploy folds it: the ratio against it is
    # what sparsity alone buys.
    folded = copy.deepcopy(dense)
    fold_batchnorm(folded, {})
    # The deployed model with every layer dense: the same BatchNorm folding, dense forms (1x1 convs as one
    # matrix product where the planner measured that faster) and pooling. The ratio against it is what the
    # sparse kernels alone buy.
    dense_dep = copy.deepcopy(dep)
    for _, layer in deployed_layers(dense_dep):
        layer.set_mode("dense")
    threads = torch.get_num_threads()
    runtimes = [torch_eager(dense, x)]
    cl = torch_channels_last(dense, x)
    if cl is not None:
        runtimes.append(cl)
    notes: list[str] = []
    if anchors:
        more, notes = dense_anchors(model, x, threads)
        runtimes += more
    deployed = [lambda: dep(x)]
    if bf16:
        x16 = x.bfloat16()
        dep16 = deploy(model, batch_size=batch, example_input=x, dtype=torch.bfloat16)
        deployed.append(lambda: dep16(x16))
        runtimes.append(torch_bf16_autocast(dense, x))
    with torch.no_grad():
        ref = dense(x)
        err = float((dep(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        errs = {a.name: float((a.fn().reshape(ref.shape) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                for a in runtimes}
        fitted = lambda m: lambda: _fitted(m, x)  # noqa: E731
        before = load_sample()
        times = [1e3 * t for t in interleaved_medians(
            [fitted(folded), fitted(dense_dep), *deployed, *(a.fn for a in runtimes)], reps, warmup=3,
            budget_s=1e9)]
        others = others_busy(before, load_sample())
        # Each runtime alone, back to back in blocks (its thread pool never hands over to another's between
        # calls): the interleaved figures include that hand-over; these show what it costs.
        blocked = [1e3 * t for t in blocked_medians([*deployed, *(a.fn for a in runtimes)], max(10, reps),
                                                    rounds=5, warmup=2, settle_s=0.5)] if blocked_too else None
        err16 = float((dep16(x16).float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if bf16 else None
    t_folded, t_dense_dep, t_dep = times[:3]
    nd = len(deployed)
    anchor_ms = {a.name: times[2 + nd + i] for i, a in enumerate(runtimes)}
    t_dense = anchor_ms["torch eager"]
    best_name, best_ms = _fastest(runtimes, anchor_ms, "fp32")
    rep = report(dep, x)
    sparse_rows = [r for r in rep.layers if r.sparse]
    sparse_macs = sum(r.macs or 0 for r in sparse_rows)
    cond_macs = sum(r.macs or 0 for r in sparse_rows if r.extra.get("kernel", "").startswith("condensed"))
    all_macs = sum(r.macs or 0 for r in rep.layers)
    kept = sum(r.density * r.params for r in sparse_rows) / max(1, sum(r.params for r in sparse_rows))
    kept_macs = sum((r.macs or 0) * r.density for r in sparse_rows)
    flop_limit = all_macs / max(1.0, all_macs - sparse_macs + kept_macs)
    all_params = sum(r.params for r in rep.layers)
    kept_params = sum(r.params * (r.density if r.sparse else 1.0) for r in rep.layers)
    byte_limit = all_params / max(1.0, kept_params) * (4 / 6)  # fp32 values + 16-bit indices, at best
    limit = max(flop_limit, byte_limit)
    return {
        "kind": "model", "batch": batch, "input": list(x.shape), "deployed_ms": round(t_dep, 3),
        "fastest_dense": best_name, "fastest_dense_ms": round(best_ms, 3),
        "ratio_vs_fastest_dense": round(best_ms / t_dep, 2),
        "dense_ms": round(t_dense, 3), "ratio": round(t_dense / t_dep, 2),
        "dense_runtimes_ms": {n: round(t, 3) for n, t in anchor_ms.items()},
        "dense_runtimes_precision": {a.name: a.precision for a in runtimes},
        "dense_runtimes_rel_err": errs, "dense_runtime_notes": notes,
        "blocked_ms": None if blocked is None else {
            **dict(zip(["deployed", "deployed bf16"], (round(t, 3) for t in blocked[:nd]))),
            **{a.name: round(t, 3) for a, t in zip(runtimes, blocked[nd:])}},
        "dense_runtime_versions": {a.name: a.info.get("version") for a in runtimes[1:]},
        "dense_bn_folded_ms": round(t_folded, 3), "ratio_vs_bn_folded": round(t_folded / t_dep, 2),
        "dense_deployed_ms": round(t_dense_dep, 3), "ratio_vs_dense_deployed": round(t_dense_dep / t_dep, 2),
        "sparse_mac_share": round(sparse_macs / max(1, all_macs), 4),
        "condensed_share_of_sparse_macs": round(cond_macs / max(1, sparse_macs), 4),
        "kept_density": round(kept, 4), "layers": len(sparse_rows),
        "condensed_layers": sum(1 for r in sparse_rows if r.extra.get("kernel", "").startswith("condensed")),
        "limit": round(limit, 2), "above_limit": t_dense / t_dep > limit * 1.02,
        "others_busy_cpus": others, "loaded": loaded(others, threads),
        "plan_s": round(plan_s, 1), "max_rel_err": err, "planner": getattr(dep, "semisparse_plan", {}),
        "per_layer": [{"layer": r.name, "kernel": r.extra.get("kernel"), "ratio": r.extra.get("ratio"),
                       "spread": r.extra.get("spread"), "macs": r.macs} for r in sparse_rows],
        **(_bf16_figures(times[3], err16, runtimes, anchor_ms) if bf16 else {}),
    }


def _fastest(runtimes: list, anchor_ms: dict[str, float], precision: str) -> tuple[str, float]:
    """The name and ms of the fastest dense runtime computing in ``precision``."""
    return min(((a.name, anchor_ms[a.name]) for a in runtimes if a.precision == precision), key=lambda nt: nt[1])


def _bf16_figures(t_dep16: float, err: float, runtimes: list, anchor_ms: dict[str, float]) -> dict:
    """The bf16 deployed model's row entries: its time, and its ratio against the fastest bf16 dense runtime."""
    name, ms = _fastest(runtimes, anchor_ms, "bf16")
    return {"deployed_bf16_ms": round(t_dep16, 3), "fastest_bf16_dense": name, "fastest_bf16_dense_ms": round(ms, 3),
            "ratio_bf16_vs_fastest_bf16_dense": round(ms / t_dep16, 2), "max_rel_err_bf16": err}


def _fitted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with cpus.fitted_threads():  # the deployed model's thread sizing, for the dense side too
        return model(x)


def dense_copy(model: nn.Module) -> nn.Module:
    """A plain eval copy of the sparsified ``model`` with its masks multiplied in (the dense reference)."""
    return detached_copy(model)[0]


def load_sample() -> tuple[float, float, float] | None:
    """``(time, busy CPU seconds of this process's CPUs, this process's CPU seconds)`` from ``/proc/stat``."""
    try:
        with open("/proc/stat") as fh:
            stat = fh.read(16384)
        mine = frozenset(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return None
    return time.monotonic(), cpus.busy_seconds(stat, mine), time.process_time()


def others_busy(a: tuple | None, b: tuple | None) -> float | None:
    """CPUs other processes kept busy on average between two :func:`load_sample` (None where unknown)."""
    if a is None or b is None or b[0] - a[0] <= 0:
        return None
    return round(max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0]), 2)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loaded(others: float | None, threads: int) -> bool:
    """Whether the CPUs a measurement's threads needed were taken by other processes (more than a quarter CPU)."""
    if others is None:
        return False
    return others + threads > available_cpus() + 0.25


def marks(r: dict, ratio: float | None = None) -> str:
    """``!`` where a ratio exceeds the byte/FLOP limit (``ratio``: the one shown, judged against the row's
    ``limit``; else the row's own ratio against torch's dense), ``~`` where others held the CPUs. A stalled
    torch eager flags only the ratio against it, not the one against a faster dense runtime."""
    above = r.get("above_limit") if ratio is None or "limit" not in r else ratio > r["limit"] * 1.02
    return ("!" if above else "") + ("~" if r.get("loaded") else "")


def footnotes(rows: list[dict]) -> list[str]:
    """One line per flag used in ``rows``: what a marker beside a ratio means."""
    out = []
    if any(r.get("above_limit") for r in rows):
        out.append("! above the byte/FLOP limit: cannot be a true speed-up; the dense side ran below its own speed "
                   "(stalled threads, caches) - not a result")
    if any(r.get("loaded") for r in rows):
        busy = max(r.get("others_busy_cpus") or 0.0 for r in rows if r.get("loaded"))
        out.append(f"~ measured while other processes kept up to {busy:.2f} of the {available_cpus()} CPUs busy "
                   "(more than the threads left free): timings unreliable, rerun on a quiet machine")
    return out


def format_table(rows: list[dict]) -> str:
    lines = []
    layer_rows = [r for r in rows if r["kind"] == "layer"]
    if layer_rows:
        head = ["layer", "sparsity", "batch", "dense ms", "condensed ms", "ratio (cold)", "ratio (warm)", "CSR ms",
                "CSR ratio", "byte limit", "FLOP limit"]
        body = [[r["shape"], f"{r['sparsity']:g}", str(r["batch"]), f"{r['dense_ms']:.4f}",
                 f"{r['condensed_ms']:.4f}", f"{r['ratio']:.2f}x{marks(r)}", f"{r['ratio_warm']:.2f}x",
                 "-" if r["csr_ms"] is None else f"{r['csr_ms']:.4f}",
                 "-" if r["csr_ratio"] is None else f"{r['csr_ratio']:.2f}x",
                 f"{r['byte_limit']:.2f}x", f"{r['flop_limit']:.2f}x"] for r in layer_rows]
        lines += table(head, body)
    model_rows = [r for r in rows if r["kind"] == "model"]
    if model_rows:
        if lines:
            lines.append("")
        names = []
        for r in model_rows:
            names += [n for n in r["dense_runtimes_ms"] if n not in names and n != "torch eager"]
        bf16 = any("deployed_bf16_ms" in r for r in model_rows)
        head = ["model", "masks", "sparsity", "batch", "input", "deployed ms", "vs fastest dense", "fastest dense",
                *(["deployed bf16 ms", "bf16 vs fastest bf16 dense"] if bf16 else []),
                "torch eager ms", "vs eager", *[f"{n} ms" for n in names], "deployed all-dense ms",
                "vs all-dense", "limit", "condensed layers"]
        body = [[r["model"], r["masks"], f"{r['sparsity']:g}", str(r["batch"]), "x".join(map(str, r["input"][1:])),
                 f"{r['deployed_ms']:.2f}", _fastest_ratio_cell(r), r["fastest_dense"],
                 *([f"{r['deployed_bf16_ms']:.2f}" if "deployed_bf16_ms" in r else "-", _bf16_ratio_cell(r)]
                   if bf16 else []),
                 f"{r['dense_ms']:.2f}", f"{r['ratio']:.2f}x{marks(r)}",
                 *[f"{r['dense_runtimes_ms'][n]:.2f}" if n in r["dense_runtimes_ms"] else "-" for n in names],
                 f"{r['dense_deployed_ms']:.2f}", f"{r['ratio_vs_dense_deployed']:.2f}x", f"{r['limit']:.2f}x",
                 f"{r['condensed_layers']}/{r['layers']}"] for r in model_rows]
        lines += table(head, body)
        notes = sorted({n for r in model_rows for n in r.get("dense_runtime_notes", ())})
        lines += [f"note: {n}" for n in notes]
    lines += footnotes(rows)
    return "\n".join(lines)


def _fastest_ratio_cell(r: dict) -> str:
    return f"{r['ratio_vs_fastest_dense']:.2f}x{marks(r, r['ratio_vs_fastest_dense'])}"


def _bf16_ratio_cell(r: dict) -> str:
    if "ratio_bf16_vs_fastest_bf16_dense" not in r:
        return "-"
    ratio = r["ratio_bf16_vs_fastest_bf16_dense"]
    return f"{ratio:.2f}x{marks(r, ratio)} ({r['fastest_bf16_dense']})"


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.pattern is None:
        args.pattern = "2:4" if args.device == "cuda" else "fan-in"
    if args.device == "cuda" and args.dtype is None:
        args.dtype = "bf16"
    if args.device == "cpu" and args.dtype == "fp16":
        raise SemisparseError("--dtype fp16 is for --device cuda; on CPU semisparse deploys fp32 (default) or bf16")
    if args.device == "cuda":
        from .bench_cuda import main_cuda

        return main_cuda(args)
    if args.threads < 1:
        raise SemisparseError(f"--threads must be >= 1, got {args.threads}")
    if args.reps < 1:
        raise SemisparseError(f"--reps must be >= 1, got {args.reps}")
    if args.input_size is not None and (not 1 <= len(args.input_size) <= 4 or min(args.input_size) < 1):
        raise SemisparseError(f"--input-size takes 1 to 4 positive sizes (C H W, H W or S), got {args.input_size}")
    for s in args.sparsity or ():
        if not 0.0 < s < 1.0:
            raise SemisparseError(f"--sparsity values must be in (0, 1), got {s}")
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(before)


def _last_line(row: dict) -> str:
    """The table line of one row (progress while the rest is measured)."""
    return format_table([dict(row, above_limit=False, loaded=False, dense_runtime_notes=[])]).splitlines()[2]


def _run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    info = machine()
    print(f"machine: {info['cpu']} ({info['cores']} cores), threads {info['threads']}, torch {info['torch']}, "
          f"fp32, kernels {'on' if info['kernels'] else 'OFF'} (SIMD {info['simd_bits']} bit), "
          f"load avg {info['load_avg_1min']} on {info['cpus_available']} CPUs available", flush=True)
    rows = []
    layers = args.layer if args.layer is not None else ([] if args.model or args.file else ["768x3072"])
    for spec in layers:
        try:
            out_f, in_f = (int(v) for v in spec.lower().split("x"))
        except ValueError:
            raise SemisparseError(f"--layer takes OUTxIN, e.g. 768x3072; got {spec!r}") from None
        sparsities = args.sparsity or [0.9, 0.8]
        batches = args.batch or [1, 256]
        for s in sparsities:
            for b in batches:
                if s < 0.85 and b != 1 and args.sparsity is None and args.batch is None:
                    continue  # the default set: 90% at batch 1 and 256, 80% at batch 1 (the targets)
                rows.append(bench_linear(out_f, in_f, s, b, args.reps, csr=not args.no_csr))
                print(_last_line(rows[-1]), flush=True)
    for name in args.model or ():
        for s in args.sparsity or [0.9]:
            for b in args.batch or [1]:
                rows.append(bench_model(name, s, b, max(5, args.reps // 2), args.masks, args.ablation,
                                        args.image_size, args.pattern, anchors=not args.no_anchors,
                                        bf16=args.dtype == "bf16"))
                print(_last_line(rows[-1]), flush=True)
            if args.pattern in ("2:4", "2:4-rows4"):
                break  # 2:4 has one sparsity
    for path in args.file or ():
        for b in args.batch or [1]:
            rows.append(bench_file(path, args.input_size, b, max(5, args.reps // 2), anchors=not args.no_anchors,
                                   bf16=args.dtype == "bf16"))
            print(_last_line(rows[-1]), flush=True)
    return finish(format_table(rows), args.json, info, rows)

