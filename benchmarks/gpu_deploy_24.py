"""One GPU run for the deploy targets: probe cuSPARSELt, check correctness, time 2:4 and condensed deploys.

Made for a short device session (H100/H200, torch 2.11 + CUDA 13, cuSPARSELt 0.8): parts run in priority
order, each with a time cap (checked before every item; an item already running finishes), and the JSON is
rewritten after every item, so a run cut short still leaves what it measured.

    probe        torch / CUDA / cuSPARSELt versions, ``torch._cslt_sparse_mm``'s schema and a call with each
                 keyword checked against dense (bias, transpose_result, alg_id), what the search returns
    correctness  per-layer and whole-model relative errors vs dense bf16 (and vs fp32) for ViT-B/16 (random
                 head: torchvision zero-inits it), ConvNeXt-T, ResNet-50, all-sparse plans (every eligible
                 layer on cuSPARSELt, k x k convs lowered) at a small batch; a saved plan reloaded
    layers       ViT-B/16 GEMM shapes at 197 / 3152 / 12608 / 50432 tokens: dense vs 2:4, graphed
    vit_b_16     whole model at batch 256, 64, 1 (planner on, graphed; baselines: original dense graphed,
    convnext_tiny  deployed all-dense graphed, eager dense)
    resnet50
    kxk          3x3 convs of ResNet-50 lowered per tap and by im2col vs torch's conv, channels-last
    compile      torch.compile(dense, mode="max-autotune") for ViT-B/16 at 256 and 64, if time is left

  constant fan-in layers on the condensed Triton kernels, through ``ss.deploy(device="cuda")``:

    condensed_correctness  a small model (1x1 convs on channels-last, MHA, MLP with ablated neurons) in fp32 and
                 bf16, planned (every kernel config timed): relative error vs the masked model; a saved plan
                 reloaded without timing gives the same outputs
    condensed_layers  Linear 3072->768 (OUTxIN 768x3072), 90% then 80%, fp32 and bf16, batch 256 / 1 / 32:
                 dense vs every config (graphed, TF32 off in fp32), the best config and its ratio
    condensed_models  ViT-B/16 and ResNet-50 at 90% SRigL-like masks, fp32, batch 256 then 1: the ratio vs the
                 graphed dense model and the share of the sparse MACs that ran condensed

``benchmarks/gpu_all.sh`` runs these parts and ``benchmarks/gpu_condensed.py`` in priority order with budgets.

    PYTHONPATH=src python3 benchmarks/gpu_deploy_24.py            # writes $OUT/gpu_deploy_24.json
    PYTHONPATH=src python3 benchmarks/gpu_deploy_24.py --smoke    # CPU: emulated cuSPARSELt, tiny models
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the condensed parts run Triton's interpreter on CPU: on before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

import semisparse as ss  # noqa: E402
from semisparse.cli.bench_cuda import (  # noqa: E402
    bench_condensed_layer,
    bench_layer_cuda,
    bench_model_cuda,
    layer_errors,
    machine_cuda,
    make_model,
    randomize_zero_layers,
    rel_err,
)
from semisparse.runtime.cuda import EmulatedBackend, EmulatedGraphs, deploy_cuda, save_plan  # noqa: E402
from semisparse.runtime.timing import WallTimer  # noqa: E402

#: Seconds per part (the whole run should stay under ~7 minutes of a 10-minute device budget).
CAPS = {"probe": 20, "correctness": 75, "layers": 35, "vit_b_16": 90, "convnext_tiny": 70, "resnet50": 70,
        "kxk": 30, "compile": 120, "condensed_correctness": 30, "condensed_layers": 60, "condensed_models": 100}
ISSUE_13 = ("probe", "correctness", "layers", "vit_b_16", "convnext_tiny", "resnet50", "kxk", "compile")
ISSUE_16 = ("condensed_correctness", "condensed_layers", "condensed_models")


class Run:
    def __init__(self, path: str, budget_s: float) -> None:
        self.path, self.start, self.budget = path, time.perf_counter(), budget_s
        self.data: dict = {"parts": {}, "errors": [], "notes": []}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        with open(self.path, "w") as fh:
            json.dump(self.data, fh, indent=2, default=str)

    def part(self, name: str, cap: float, items):
        """Run ``items`` (callables returning a JSON-able row) until the part's cap or the budget is spent."""
        deadline = time.perf_counter() + min(cap, max(0.0, self.left()))
        rows = self.data["parts"].setdefault(name, [])
        t0 = time.perf_counter()
        for label, fn in items:
            if time.perf_counter() > deadline:
                rows.append({"skipped": label, "why": "time cap"})
                continue
            t = time.perf_counter()
            try:
                row = fn()
                row = row if isinstance(row, dict) else {"result": row}
                row.setdefault("item", label)
                row["seconds"] = round(time.perf_counter() - t, 1)
                rows.append(row)
                print(f"[{name}] {label}: {summary(row)}", flush=True)
            except Exception as exc:  # keep going: one failure must not cost the rest of the run
                self.data["errors"].append({"part": name, "item": label, "error": f"{type(exc).__name__}: {exc}",
                                            "trace": traceback.format_exc()[-2000:]})
                print(f"[{name}] {label}: FAILED {type(exc).__name__}: {exc}", flush=True)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self.save()
        print(f"[{name}] done in {time.perf_counter() - t0:.0f}s, {self.left():.0f}s left", flush=True)


def summary(row: dict) -> str:
    keys = ("ratio_vs_original", "ratio_vs_all_dense", "ratio", "config", "condensed_mac_share", "rel_err_vs_dense",
            "rel_err_vs_masked", "max_layer_rel_err", "rel_err", "deployed_ms", "ok")
    return ", ".join(f"{k}={row[k]}" for k in keys if k in row) or str(row)[:200]


# --- probe ------------------------------------------------------------------------------------------------------

def probe() -> dict:
    out = machine_cuda()
    op = getattr(torch.ops.aten, "_cslt_sparse_mm", None)
    out["cslt_sparse_mm_schema"] = str(op.default._schema) if op is not None else None
    s = getattr(torch.ops.aten, "_cslt_sparse_mm_search", None)
    out["cslt_search_schema"] = str(s.default._schema) if s is not None else None
    try:
        out["max_alg_id"] = torch.backends.cusparselt.get_max_alg_id()
    except Exception as exc:
        out["max_alg_id"] = f"{type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        return out
    from semisparse.patterns import nm_mask

    w = torch.randn(768, 3072)
    w = (w * nm_mask(w.abs(), 2, 4)).cuda().bfloat16()
    b = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(208, 3072, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x, w, b)
    packed = torch._cslt_compress(w)
    out["packed_numel_per_dense"] = packed.numel() / w.numel()
    calls = {
        "plain": lambda: torch._cslt_sparse_mm(packed, x.t()).t() + b,
        "bias": lambda: torch._cslt_sparse_mm(packed, x.t(), bias=b).t(),
        "bias+transpose_result": lambda: torch._cslt_sparse_mm(packed, x.t(), bias=b, transpose_result=True),
        "bias+transpose_result+alg_id": lambda: torch._cslt_sparse_mm(packed, x.t(), bias=b, transpose_result=True,
                                                                      alg_id=0),
    }
    for name, fn in calls.items():
        try:
            got = fn()
            out[f"call_{name}"] = {"shape": list(got.shape), "rel_err": rel_err(got, ref)}
        except Exception as exc:
            out[f"call_{name}"] = f"{type(exc).__name__}: {exc}"
    try:
        found = torch._cslt_sparse_mm_search(packed, x.t(), bias=b, transpose_result=True)
        out["search_returns"] = repr(found)
    except Exception as exc:
        out["search_returns"] = f"{type(exc).__name__}: {exc}"
    try:
        odd = torch.randn(197, 3072, device="cuda", dtype=torch.bfloat16)
        torch._cslt_sparse_mm(packed, odd.t(), bias=b, transpose_result=True)
        out["197_tokens_unpadded"] = "accepted"
    except Exception as exc:
        out["197_tokens_unpadded"] = f"refused: {type(exc).__name__}: {str(exc)[:200]}"
    out["ok"] = all(isinstance(v, dict) and v["rel_err"] < 1e-2 for k, v in out.items() if k.startswith("call_"))
    return out


# --- correctness --------------------------------------------------------------------------------------------------

def correctness(factory, batch: int, plan: str, kw: dict, dtype, save_to: str | None = None) -> dict:
    torch.manual_seed(0)
    model = factory()
    randomize_zero_layers(model)
    from semisparse.runtime import default_example_input

    x = default_example_input(model, batch)
    ss.sparsify(model, "2:4")
    dep = deploy_cuda(model, dtype, batch, x, plan=plan, **kw)
    dev = kw.get("device") or "cuda"
    m32 = model.to(dev).eval()
    with torch.no_grad():
        ref32 = m32(x.to(dev))
        dense = deploy_cuda(model.cpu(), dtype, batch, x, plan="dense", **kw)
        ref = dense(x)
        out = dep(x)
        again = dep(x)
    row = {"plan": plan, "batch": batch, "rel_err_vs_dense": rel_err(out, ref), "rel_err_vs_fp32": rel_err(out, ref32),
           "dense_rel_err_vs_fp32": rel_err(ref, ref32), "replay_equal": bool(torch.equal(out, again)),
           "sparse_layers": dep.semisparse_plan["sparse_layers"], "layers": dep.semisparse_plan["layers"],
           "forms": sorted({lay.choice for lay in dep.module.modules() if hasattr(lay, "choice")})}
    errs = layer_errors(dep, x.to(dev, dtype).contiguous(
        memory_format=torch.channels_last if x.dim() == 4 else torch.contiguous_format))
    row["max_layer_rel_err"] = max((e["rel_err"] for e in errs), default=0.0)
    row["layer_errors"] = errs
    if save_to:
        save_plan(dep, save_to)
        t = time.perf_counter()
        loaded = deploy_cuda(model.cpu(), dtype, batch, x, plan=save_to, **kw)
        row["reload_s"] = round(time.perf_counter() - t, 2)
        with torch.no_grad():
            row["reloaded_equal"] = bool(torch.equal(loaded(x), out))
    return row


def kxk_row(cin: int, cout: int, size: int, batch: int, stride: int, dtype, timer, backend, device) -> dict:
    from semisparse.patterns import nm_mask
    from semisparse.runtime.cuda.eligibility import LayerSpec
    from semisparse.runtime.cuda.layers import PlannedLayer

    torch.manual_seed(0)
    w = torch.randn(cout, cin, 3, 3)
    view = w.permute(0, 2, 3, 1).reshape(cout, -1)
    mask = nm_mask(view.abs(), 2, 4).reshape(cout, 3, 3, cin).permute(0, 3, 1, 2)
    w = (w * mask).to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout, device=device, dtype=dtype)
    spec = LayerSpec("conv", "Conv2d", w, mask, b, "2:4", {"stride": stride, "padding": 1, "dilation": 1, "groups": 1})
    layer = PlannedLayer(spec, backend)
    x = torch.randn(batch, cin, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    row = {"conv": f"{cout}x{cin}x3x3 s{stride}", "input": [batch, cin, size, size]}
    with torch.no_grad():
        ref = layer.forms["dense"](x)
        for name, form in layer.forms.items():
            got = form(x)
            row[f"{name}_ms"] = round(timer(lambda form=form: form(x), ("layer", "conv", name)) * 1e3, 4)
            row[f"{name}_rel_err"] = rel_err(got, ref)
    for name in layer.forms:
        if name != "dense":
            row[f"{name}_ratio"] = round(row["dense_ms"] / row[f"{name}_ms"], 3)
    return row


# --- constant fan-in layers through the condensed form -------------------------------------------------

class SmallNet(nn.Module):
    """1x1 convs (stride 1 and 2) on channels-last, an MHA, an MLP whose ablated neurons fold, a head."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, c, 1)
        self.down = nn.Conv2d(c, c, 1, stride=2)
        self.attn = nn.MultiheadAttention(c, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(F.relu(self.conv(x)))
        t = y.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t + self.mlp(t)
        return self.head(t.mean(1))


def condensed_correctness(dtype, kw: dict, batch: int, size: int, save_to: str) -> dict:
    from semisparse.runtime.cuda.planner import planned_layers

    torch.manual_seed(0)
    model = SmallNet().eval()
    ss.sparsify(model, 0.9)
    masks = ss.masks(model)
    masks["mlp.0.weight"][::9] = False  # ablated neurons (folded) and an ablated conv channel (bias only)
    masks["conv.weight"][3] = False
    ss.sparsify(model, None, masks=masks, overwrite=True)
    dev = kw.get("device") or "cuda"
    x = torch.randn(batch, 32, size, size)
    with torch.no_grad():
        ref = model.to(dev).to(dtype)(x.to(dev, dtype))
        model.cpu().float()
    dep = deploy_cuda(model, dtype, batch, x, **kw)
    with torch.no_grad():
        out = dep(x)
    lays = planned_layers(dep.module)
    row = {"dtype": str(dtype).removeprefix("torch."), "rel_err_vs_masked": rel_err(out, ref),
           "forms": {lay.key: lay.choice for _, lay in lays},
           "configs": {lay.key: lay.figures.get("config") for _, lay in lays},
           "ratios": {lay.key: lay.figures.get("ratio") for _, lay in lays},
           "notes": {lay.key: lay.notes for _, lay in lays if lay.notes},
           "macs": dep.semisparse_plan.get("macs"), "planner": dep.semisparse_plan.get("model")}
    save_plan(dep, save_to)

    def no_timer(fn, what):
        raise AssertionError("a loaded plan must not time anything")

    t = time.perf_counter()
    loaded = deploy_cuda(model, dtype, batch, x, plan=save_to, **{**kw, "timer": no_timer})
    row["reload_s"] = round(time.perf_counter() - t, 2)
    with torch.no_grad():
        row["reloaded_equal"] = bool(torch.equal(loaded(x), out))
    row["ok"] = row["reloaded_equal"] and row["rel_err_vs_masked"] < (1e-5 if dtype == torch.float32 else 3e-2)
    return row


# --- tiny models for --smoke ------------------------------------------------------------------------------------------

def tiny_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=64, mlp_dim=128, num_classes=40).eval()


def tiny_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    m = ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)], num_classes=24).eval()
    m.image_size = 32
    return m


def tiny_resnet() -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    m = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=24, width_per_group=16).eval()
    m.image_size = 32
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU: emulated cuSPARSELt and graphs, tiny models")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_deploy_24.json (default $OUT)")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new items after this many seconds")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--only", nargs="*", default=None, help="run only these parts")
    p.add_argument("--caps", nargs="*", default=[], metavar="PART=SECONDS", help="override parts' time caps")
    args = p.parse_args(argv)
    for item in args.caps:
        part, _, secs = item.partition("=")
        if part not in CAPS or not secs:
            p.error(f"--caps takes PART=SECONDS with PART one of {', '.join(CAPS)}; got {item!r}")
        CAPS[part] = float(secs)
    os.makedirs(args.out, exist_ok=True)
    run = Run(os.path.join(args.out, "gpu_deploy_24.json" if not args.smoke else "gpu_deploy_24_smoke.json"),
              args.budget_s)
    dtype = torch.bfloat16
    if args.smoke:
        device, backend, graphs = "cpu", EmulatedBackend(), EmulatedGraphs()
        timer = eager = WallTimer(reps=2, warmup=1)
        models = {"vit_b_16": (tiny_vit, [4, 1]), "convnext_tiny": (tiny_convnext, [2]),
                  "resnet50": (tiny_resnet, [2])}
        layer_shapes, tokens = [(48, 64), (40, 64)], [7, 32]
        kxk = [(32, 32, 8, 2, 1)]
        corr_batch = 2
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU here: run with --smoke on CPU", file=sys.stderr)
            return 2
        from semisparse.runtime.cuda import require_cusparselt
        from semisparse.runtime.timing import GraphTimer

        device, backend, graphs = "cuda", require_cusparselt(), None
        timer, eager = GraphTimer(args.reps), GraphTimer(args.reps, graphed=False)
        models = {"vit_b_16": (lambda: make_model("vit_b_16"), [256, 64, 1]),
                  "convnext_tiny": (lambda: make_model("convnext_tiny"), [256, 64, 1]),
                  "resnet50": (lambda: make_model("resnet50"), [256, 64, 1])}
        layer_shapes = [(3072, 768), (768, 3072), (2304, 768), (768, 768), (1000, 768)]
        tokens = [197, 3152, 12608, 50432]
        kxk = [(64, 64, 56, 64, 1), (128, 128, 28, 64, 1), (256, 256, 14, 64, 1), (512, 512, 7, 64, 1),
               (64, 64, 56, 256, 1), (256, 256, 14, 256, 1)]
        corr_batch = 8
    kw = {"backend": backend, "graphs": graphs, "timer": timer, "device": device}
    model_kw = {"backend": backend, "graphs": graphs, "device": device}
    run.data["machine"] = machine_cuda() | {"smoke": args.smoke, "reps": args.reps}

    def want(part: str) -> bool:
        return args.only is None or part in args.only

    if want("probe"):
        run.part("probe", CAPS["probe"], [("probe", probe)])
    if want("correctness"):
        items = []
        for name, (factory, _) in models.items():
            for plan in ("sparse", "measure"):
                save = os.path.join(args.out, f"plan_{name}.safetensors") if plan == "measure" else None
                items.append((f"{name} {plan}", lambda f=factory, pl=plan, s=save: correctness(
                    f, corr_batch, pl, kw, dtype, s)))
        run.part("correctness", CAPS["correctness"], items)
    if want("layers"):
        items = [(f"{o}x{i} T={t}", lambda o=o, i=i, t=t: bench_layer_cuda(o, i, t, dtype, timer, backend, device))
                 for t in sorted(tokens, reverse=True) for o, i in layer_shapes]
        run.part("layers", CAPS["layers"], items)
    for name, (factory, batches) in models.items():
        if want(name):
            items = [(f"{name} b{b}", lambda f=factory, b=b: bench_model_cuda(
                f, b, dtype, timer=timer, eager_timer=eager, **model_kw)) for b in batches]
            run.part(name, CAPS[name], items)
    if want("kxk"):
        items = [(f"{co}x{ci} {s}px b{b}", lambda ci=ci, co=co, s=s, b=b, st=st: kxk_row(ci, co, s, b, st, dtype,
                                                                                         timer, backend, device))
                 for ci, co, s, b, st in kxk]
        run.part("kxk", CAPS["kxk"], items)
    if want("condensed_correctness"):
        size = 8 if args.smoke else 16
        items = [(f"small net {str(dt)[6:]}", lambda dt=dt: condensed_correctness(
            dt, kw, 1 if args.smoke else 4, size, os.path.join(args.out, f"plan_condensed_{str(dt)[6:]}.safetensors")))
            for dt in (torch.float32, torch.bfloat16)]
        run.part("condensed_correctness", CAPS["condensed_correctness"], items)
    if want("condensed_layers"):
        shape = (32, 96) if args.smoke else (768, 3072)
        cases = [(torch.float32, 0.9, 256), (torch.float32, 0.9, 1), (torch.bfloat16, 0.9, 256),
                 (torch.float32, 0.9, 32), (torch.bfloat16, 0.9, 1), (torch.bfloat16, 0.9, 32)]
        cases += [(dt, 0.8, b) for dt, _, b in cases]
        if args.smoke:
            cases = [(dt, s, min(b, 8)) for dt, s, b in cases[:3]]
        items = [(f"{shape[0]}x{shape[1]} {str(dt)[6:]} {s:.0%} b{b}", lambda dt=dt, s=s, b=b: bench_condensed_layer(
            *shape, b, s, dt, timer, device)) for dt, s, b in cases]
        run.part("condensed_layers", CAPS["condensed_layers"], items)
    if want("condensed_models"):
        cmodels = {"vit_b_16": models["vit_b_16"][0], "resnet50": models["resnet50"][0]}
        batches = [1] if args.smoke else [256, 1]
        items = [(f"{name} fp32 90% b{b}", lambda f=f, b=b, name=name: bench_model_cuda(
            f, b, torch.float32, timer=timer, eager_timer=eager, pattern=0.9, masks="srigl", ablation=0.1,
            plan="sparse" if args.smoke else "measure", image_size=16 if args.smoke and name == "resnet50" else None,
            **model_kw))  # smoke: the interpreter is too slow to time every config of a model
            for b in batches for name, f in cmodels.items()]
        run.part("condensed_models", CAPS["condensed_models"], items)
    if want("compile") and not args.smoke:
        factory = models["vit_b_16"][0]
        items = [(f"vit_b_16 b{b} compiled", lambda b=b: bench_model_cuda(
            factory, b, dtype, timer=timer, eager_timer=eager, compile_dense=True, plan="sparse", **model_kw))
            for b in (256, 64)]
        run.part("compile", CAPS["compile"], items)
    run.save()
    print(f"wrote {run.path} ({len(run.data['errors'])} errors, {run.data['elapsed_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
