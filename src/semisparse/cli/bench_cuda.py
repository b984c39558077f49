"""``semisparse bench --device cuda``: 2:4 and constant fan-in layers and whole models on an NVIDIA GPU,
against the baselines.

Every time is a median of CUDA-event intervals after warm-up. Layer rows time ``x (T, in) @ W.T + b``
dense (cuBLAS) and through cuSPARSELt (searched algorithm, bias fused), both captured in CUDA graphs.
Model rows deploy a 2:4 (magnitude) model with ``ss.deploy(device="cuda")`` and time, all in the same dtype
and memory format (channels-last for CNNs):

* ``deployed`` - what ``ss.deploy`` returns (graphed);
* ``original`` - the dense model (masks multiplied in) captured in a CUDA graph: the target's reference;
* ``all_dense`` - the deployed model with every layer dense (same attention, padding, BN folding), graphed;
* ``eager`` - the dense model called eagerly; ``compiled`` - ``torch.compile(dense, mode="max-autotune")``.

``--pattern fan-in`` benchmarks constant fan-in layers on the condensed Triton kernels instead: layer rows
time ``nn.Linear``'s dense GEMM and every kernel config of the condensed form (the planner's own tuning),
graphed, and report the best; model rows deploy SRigL-like masks (``--masks srigl``: ERK fan-in, ablated
neurons) at ``--sparsity`` and add the share of the sparse MACs that ran condensed. fp32 rows run with TF32
off for matmuls and cuDNN (true fp32 on both sides, as the kernels compute; the flags are restored after).

The functions take the back-end, graph mechanism and timer as arguments, so ``benchmarks/gpu_deploy_24.py
--smoke`` runs the same code on CPU with tiny models.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SemisparseError
from ..masking.parametrization import detached_copy
from .bench_common import finish, srigl_like_masks, table

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: ViT-B/16 token counts: batch 1 (197), 16, 64 and 256 images.
DEFAULT_TOKENS = (197, 3152, 12608, 50432)
DEFAULT_LAYERS = ("3072x768", "768x3072", "2304x768", "768x768", "1000x768")
#: Constant fan-in layer rows: SRigL's Linear 3072 -> 768 (OUTxIN), batches and sparsities.
DEFAULT_CONDENSED_LAYERS = ("768x3072",)
DEFAULT_CONDENSED_BATCHES = (1, 32, 256)


@contextlib.contextmanager
def strict_fp32(dtype: torch.dtype) -> Iterator[None]:
    """TF32 off for matmuls and cuDNN while timing fp32 (true fp32 on both sides), restored after."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp32 (NaN-free when ``b`` is all zeros: then ``||a||``)."""
    a, b = a.float(), b.float()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float(a.norm())


def machine_cuda() -> dict:
    from ..runtime.cuda.backend import cusparselt_version

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cusparselt": cusparselt_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
    return info


def bench_layer_cuda(out_f: int, in_f: int, tokens: int, dtype: torch.dtype, timer, backend, device) -> dict:
    """One Linear ``in_f -> out_f`` with a 2:4 weight: dense vs cuSPARSELt (alg 0 and searched), graphed."""
    from ..patterns import nm_mask
    from ..runtime.cuda.forms import LinearForm, SparseGemm

    torch.manual_seed(0)
    w = torch.randn(out_f, in_f)
    w = (w * nm_mask(w.abs(), 2, 4)).to(device=device, dtype=dtype)
    b = torch.randn(out_f, device=device, dtype=dtype)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    searched = LinearForm(SparseGemm(w, b, backend))
    plain = LinearForm(SparseGemm(w, b, backend))
    plain.gemm.alg_id = 0
    with torch.no_grad():
        ref = F.linear(x, w, b)
        err = rel_err(searched(x), ref)  # the first call searches
        t_dense = timer(lambda: F.linear(x, w, b), ("layer", "dense"))
        t_alg0 = timer(lambda: plain(x), ("layer", "alg0"))
        t_sparse = timer(lambda: searched(x), ("layer", "searched"))
    return {"kind": "layer", "shape": f"{out_f}x{in_f}", "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
            "dense_ms": round(t_dense * 1e3, 4), "sparse_ms": round(t_sparse * 1e3, 4),
            "sparse_alg0_ms": round(t_alg0 * 1e3, 4), "alg_id": searched.gemm.alg_id,
            "ratio": round(t_dense / t_sparse, 3), "ratio_alg0": round(t_dense / t_alg0, 3), "rel_err": err}


def bench_condensed_layer(out_f: int, in_f: int, batch: int, sparsity: float, dtype: torch.dtype, timer,
                          device, ablation: float = 0.0) -> dict:
    """One Linear ``in_f -> out_f`` with a constant fan-in mask at ``sparsity`` (``ablation``: share of neurons
    that keep nothing): dense ``F.linear`` vs every config of the condensed form, graphed, same dtype."""
    from ..patterns import fanin_k, fanin_mask
    from ..runtime.cuda.condensed_form import NAME
    from ..runtime.cuda.eligibility import LayerSpec
    from ..runtime.cuda.layers import PlannedLayer
    from ..runtime.cuda.planner import tune

    torch.manual_seed(0)
    k = fanin_k(in_f, sparsity)
    w = torch.randn(out_f, in_f) / in_f**0.5
    mask = fanin_mask(torch.rand(out_f, in_f), k)
    if ablation > 0:
        mask[torch.randperm(out_f)[: int(ablation * out_f)]] = False
    spec = LayerSpec("layer", "Linear", (w * mask).to(device=device, dtype=dtype), mask,
                     torch.randn(out_f).to(device=device, dtype=dtype), f"fan-in {k}")
    layer = PlannedLayer(spec, None)
    if NAME not in layer.forms:
        raise SemisparseError(f"no condensed form for this layer here: {layer.reason}")
    x = torch.randn(batch, in_f, device=device, dtype=dtype)
    dense, form = layer.forms["dense"], layer.forms[NAME]
    configs: dict[str, float] = {}
    with torch.no_grad(), strict_fp32(dtype):
        t_dense = timer(lambda: dense(x), ("layer", "layer", "dense"))
        t_best = tune(layer, NAME, form, x, timer, configs)
        ref = F.linear(x.double(), spec.weight.double(), spec.bias.double())
        err = rel_err(form(x), ref) if t_best is not None else None
    row = {"kind": "condensed-layer", "shape": f"{out_f}x{in_f}", "batch": batch, "sparsity": sparsity, "fan_in": k,
           "ablation": ablation, "dtype": str(dtype).removeprefix("torch."), "dense_ms": round(t_dense * 1e3, 5),
           "condensed_ms": None if t_best is None else round(t_best * 1e3, 5),
           "ratio": None if t_best is None else round(t_dense / t_best, 3),
           "config": None if form.config is None else form.config.name, "rel_err": err,
           "configs_ms": {n: round(t * 1e3, 5) for n, t in sorted(configs.items(), key=lambda kv: kv[1])}}
    if layer.notes:
        row["notes"] = layer.notes
    return row


def make_model(name: str) -> nn.Module:
    """A registry model with random weights; zero-initialised layers (torchvision ViT's head, which makes
    every output 0 and a relative error NaN) get random weights instead."""
    from ..models import create_model

    torch.manual_seed(0)
    model = create_model(name).eval()
    randomize_zero_layers(model)
    return model


def randomize_zero_layers(model: nn.Module) -> None:
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and not mod.weight.any():
                mod.weight.normal_(0.0, 0.02)


def layer_errors(deployed: nn.Module, x: torch.Tensor) -> list[dict]:
    """Per sparse layer: relative error of its chosen form against its dense form, on its real input."""
    from ..runtime.cuda.planner import capture_inputs, planned_layers

    inner = getattr(deployed, "module", deployed)
    inputs = capture_inputs(inner, x)
    rows = []
    with torch.no_grad():
        for name, layer in planned_layers(inner):
            if not layer.is_sparse or name not in inputs:
                continue
            dense = layer.forms[layer.dense_choice]
            xi = inputs[name]
            rows.append({"layer": layer.key, "form": layer.choice,
                         "rel_err": rel_err(layer.forms[layer.choice](xi), dense(xi))})
    return rows


def bench_model_cuda(model_or_name: str | nn.Module | Callable[[], nn.Module], batch: int, dtype: torch.dtype, *,
                     timer, eager_timer, backend=None, graphs=None, device="cuda", compile_dense: bool = False,
                     image_size: int | None = None, plan: str = "measure", lower_kxk: bool = True,
                     pattern: str | float = "2:4", masks: str = "srigl", ablation: float = 0.1) -> dict:
    """Deploy a sparse model at ``batch`` and time it against the baselines of the module docstring.

    ``pattern``: ``"2:4"`` (magnitude 2:4 masks), or a sparsity in (0, 1): constant fan-in masks, SRigL-like
    (``masks="srigl"``: ERK budgets, ``ablation`` of the neurons ablated) or uniform."""
    import semisparse as ss

    from ..runtime.example import default_example_input

    name = model_or_name if isinstance(model_or_name, str) else getattr(model_or_name, "__name__", "model")
    model = make_model(model_or_name) if isinstance(model_or_name, str) else (
        model_or_name() if callable(model_or_name) and not isinstance(model_or_name, nn.Module) else model_or_name)
    randomize_zero_layers(model)
    x = default_example_input(model, batch)
    if image_size is not None:
        x = torch.randn(*x.shape[:2], image_size, image_size)
    t0 = time.perf_counter()
    if isinstance(pattern, str):
        ss.sparsify(model, pattern)
    elif masks == "srigl":

        ss.sparsify(model, None, masks=srigl_like_masks(model, pattern, ablation))
    else:
        ss.sparsify(model, pattern)
    with strict_fp32(dtype):
        row = _bench_deployed(model, name, x, batch, dtype, t0, timer=timer, eager_timer=eager_timer, backend=backend,
                              graphs=graphs, device=device, compile_dense=compile_dense, plan=plan,
                              lower_kxk=lower_kxk)
    row["pattern"] = pattern if isinstance(pattern, str) else f"fan-in {pattern:g} ({masks})"
    return row


def _bench_deployed(model, name, x, batch, dtype, t0, *, timer, eager_timer, backend, graphs, device, compile_dense,
                    plan, lower_kxk) -> dict:
    import semisparse as ss

    from ..runtime.cuda import deploy_cuda
    from ..runtime.cuda.layers import is_sparse_form

    kw = {"backend": backend, "graphs": graphs, "timer": timer, "device": device, "lower_kxk": lower_kxk}
    dep = deploy_cuda(model, dtype, batch, x, plan=plan, **kw)
    plan_s = time.perf_counter() - t0
    all_dense = deploy_cuda(model, dtype, batch, x, plan="dense", **kw)
    dense = detached_copy(model)[0]
    fmt = torch.channels_last if any(isinstance(m, nn.Conv2d) for m in dense.modules()) else torch.contiguous_format
    dense = dense.to(device=device, dtype=dtype).to(memory_format=fmt)
    xd = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt if x.dim() == 4 else torch.contiguous_format)
    fp32 = detached_copy(model)[0]
    with torch.no_grad():
        fp32 = fp32.to(device=device)
        ref32 = fp32(x.to(device))
        del fp32
        ref = dense(xd)
        out = dep(x)
        errs = {"rel_err_vs_dense": rel_err(out, ref), "rel_err_vs_fp32": rel_err(out, ref32),
                "dense_rel_err_vs_fp32": rel_err(ref, ref32)}
        per_layer = layer_errors(dep, xd)
        t_dep = timer(lambda: dep.module(xd), ("model", "deployed", frozenset()))
        t_orig = timer(lambda: dense(xd), ("model", "original", frozenset()))
        t_all = timer(lambda: all_dense.module(xd), ("model", "all-dense", frozenset()))
        t_eager = eager_timer(lambda: dense(xd), ("model", "eager", frozenset()))
        t_comp = None
        if compile_dense:
            compiled = torch.compile(dense, mode="max-autotune")
            for _ in range(3):
                compiled(xd)
            t_comp = eager_timer(lambda: compiled(xd), ("model", "compiled", frozenset()))
    rep = ss.report(dep)
    rows = [r for r in rep.layers if r.sparse]
    row = {"kind": "model", "model": name, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
           "input": list(x.shape), "deployed_ms": round(t_dep * 1e3, 4), "original_ms": round(t_orig * 1e3, 4),
           "all_dense_ms": round(t_all * 1e3, 4), "eager_ms": round(t_eager * 1e3, 4),
           "compiled_ms": None if t_comp is None else round(t_comp * 1e3, 4),
           "ratio_vs_original": round(t_orig / t_dep, 3), "ratio_vs_all_dense": round(t_all / t_dep, 3),
           "ratio_vs_eager": round(t_eager / t_dep, 3),
           "ratio_vs_compiled": None if t_comp is None else round(t_comp / t_dep, 3),
           "sparse_layers": sum(1 for r in rows if is_sparse_form(r.extra.get("kernel", ""))),
           "layers": len(rows), "plan_s": round(plan_s, 1), **errs,
           "condensed_mac_share": (dep.semisparse_plan.get("macs") or {}).get("condensed"),
           "mac_share_by_form": (dep.semisparse_plan.get("macs") or {}).get("by_form"),
           "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
           "max_layer_rel_err": max((e["rel_err"] for e in per_layer), default=0.0),
           "planner": dep.semisparse_plan.get("model"),
           "per_layer": [{"layer": r.name, "kernel": r.extra.get("kernel"), "ratio": r.extra.get("ratio"),
                          "dense_us": r.extra.get("dense_us"), "sparse_us": r.extra.get("sparse_us"),
                          "config": r.extra.get("config"), "macs": r.macs, "why": r.reason} for r in rows],
           "layer_errors": per_layer}
    return row


def format_rows(rows: list[dict]) -> str:
    lines = []
    lay = [r for r in rows if r["kind"] == "layer"]
    if lay:
        head = ["layer OUTxIN", "tokens", "dense ms", "2:4 ms", "ratio", "ratio alg 0", "alg", "rel err"]
        lines += table(head, [[r["shape"], str(r["tokens"]), f"{r['dense_ms']:.4f}", f"{r['sparse_ms']:.4f}",
                                f"{r['ratio']:.2f}x", f"{r['ratio_alg0']:.2f}x", str(r["alg_id"]),
                                f"{r['rel_err']:.1e}"] for r in lay])
    cond = [r for r in rows if r["kind"] == "condensed-layer"]
    if cond:
        if lines:
            lines.append("")
        head = ["layer OUTxIN", "dtype", "sparsity", "batch", "dense ms", "condensed ms", "ratio", "config", "rel err"]
        lines += table(head, [[r["shape"], r["dtype"], f"{r['sparsity']:.0%}", str(r["batch"]), f"{r['dense_ms']:.4f}",
                                "-" if r["condensed_ms"] is None else f"{r['condensed_ms']:.4f}",
                                "-" if r["ratio"] is None else f"{r['ratio']:.2f}x", str(r["config"]),
                                "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"] for r in cond])
    mod = [r for r in rows if r["kind"] == "model"]
    if mod:
        lines.append("")
        head = ["model", "pattern", "dtype", "batch", "deployed ms", "vs original graphed", "vs all-dense graphed",
                "vs eager", "vs compiled", "sparse layers", "sparse MACs condensed", "rel err"]
        lines += table(head, [[r["model"], r.get("pattern", "2:4"), r["dtype"], str(r["batch"]),
                                f"{r['deployed_ms']:.3f}",
                                f"{r['ratio_vs_original']:.2f}x", f"{r['ratio_vs_all_dense']:.2f}x",
                                f"{r['ratio_vs_eager']:.2f}x",
                                "-" if r["ratio_vs_compiled"] is None else f"{r['ratio_vs_compiled']:.2f}x",
                                f"{r['sparse_layers']}/{r['layers']}",
                                "-" if r.get("condensed_mac_share") is None else f"{r['condensed_mac_share']:.1%}",
                                f"{r['rel_err_vs_dense']:.1e}"] for r in mod])
    return "\n".join(lines)


def main_cuda(args: argparse.Namespace) -> int:
    """``semisparse bench --device cuda``; ``args`` from :func:`semisparse.cli.bench.get_args_parser`."""
    from ..runtime.cuda import require_cusparselt
    from ..runtime.timing import GraphTimer

    if args.pattern not in ("2:4", "fan-in"):
        raise SemisparseError(f"--device cuda benchmarks --pattern 2:4 (cuSPARSELt) or fan-in (condensed Triton "
                              f"kernels); got --pattern {args.pattern}")
    dtype = DTYPES[args.dtype]
    backend = require_cusparselt()
    timer, eager = GraphTimer(args.reps), GraphTimer(args.reps, graphed=False)
    info = machine_cuda()
    print(f"machine: {info.get('gpu')} (sm {info.get('capability')}), torch {info['torch']}, CUDA {info['cuda']}, "
          f"cuSPARSELt {info['cusparselt']}, {args.dtype}", flush=True)
    if args.pattern == "fan-in":
        rows = _condensed_rows(args, dtype, timer, eager, backend)
    else:
        rows = _rows_24(args, dtype, timer, eager, backend)
    return finish(format_rows(rows), args.json, info, rows)


def _condensed_rows(args: argparse.Namespace, dtype: torch.dtype, timer, eager, backend) -> list[dict]:
    """Constant fan-in rows: Linear layers at each sparsity and batch, then whole models (SRigL-like masks)."""
    rows: list[dict] = []
    layers = args.layer if args.layer is not None else ([] if args.model else list(DEFAULT_CONDENSED_LAYERS))
    for spec in layers:
        out_f, in_f = _shape(spec)
        for s in args.sparsity or (0.9, 0.8):
            for b in args.batch or DEFAULT_CONDENSED_BATCHES:
                rows.append(bench_condensed_layer(out_f, in_f, b, s, dtype, timer, "cuda"))
                print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    for name in args.model or ():
        for s in args.sparsity or (0.9,):
            for b in args.batch or (1, 256):
                rows.append(bench_model_cuda(name, b, dtype, timer=timer, eager_timer=eager, backend=backend,
                                             compile_dense=not args.no_compile, image_size=args.image_size,
                                             pattern=s, masks=args.masks, ablation=args.ablation))
                print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def _shape(spec: str) -> tuple[int, int]:
    try:
        out_f, in_f = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise SemisparseError(f"--layer takes OUTxIN, e.g. 768x3072; got {spec!r}") from None
    return out_f, in_f


def _rows_24(args: argparse.Namespace, dtype: torch.dtype, timer, eager, backend) -> list[dict]:
    rows = []
    layers = args.layer if args.layer is not None else ([] if args.model else list(DEFAULT_LAYERS))
    for spec in layers:
        out_f, in_f = _shape(spec)
        for t in args.tokens or DEFAULT_TOKENS:
            rows.append(bench_layer_cuda(out_f, in_f, t, dtype, timer, backend, "cuda"))
            print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    for name in args.model or ():
        for b in args.batch or [1, 64, 256]:
            rows.append(bench_model_cuda(name, b, dtype, timer=timer, eager_timer=eager, backend=backend,
                                         compile_dense=not args.no_compile, image_size=args.image_size))
            print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    return rows
