"""``ss.deploy(model, device="cuda")``: 2:4 layers through cuSPARSELt and constant fan-in layers through
condensed Triton kernels, planned, inside CUDA graphs.

The steps, each in its own module: read the masks off a copy of the model, remove ablated neurons of
``Linear -> elementwise -> Linear`` chains as the CPU deploy does, and fold eval BatchNorm into convs; turn
every masked Linear, MHA projection and Conv2d into a :class:`~.layer.PlannedLayer` holding its candidate
forms (:mod:`.eligibility` decides what may run 2:4 and why not, :mod:`.condensed_form` what runs
condensed); move to the device and
dtype (channels-last for models with convs); plan (:mod:`.planner`) or load a saved plan (:mod:`.plan_io`);
wrap in :class:`~.graph.GraphedModule` and capture the planned input shape.

``backend``, ``graphs``, ``timer`` and ``device`` are injectable: with :class:`~.backend.EmulatedBackend`,
:class:`~.graph.EmulatedGraphs` and a fake timer, the whole flow runs on CPU (tests, ``--smoke``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from ...errors import SemisparseError
from ...masking.parametrization import detached_copy, sparse_weights
from ..attention import SparseMultiheadAttention, unsupported_reason
from ..example import default_example_input
from ..fold import fold_ablated, fold_batchnorm
from ..plain import carry_hooks, why_not_plain
from ..swap import masked_layers, registered_names, replace_everywhere
from ..timing import Timer
from .backend import EmulatedBackend, require_cusparselt
from .eligibility import LayerSpec
from .graph import MAX_SHAPES, CudaGraphs, EmulatedGraphs, GraphedModule
from .layers import PlannedLayer
from .planner import mac_shares, plan_layers, plan_model, plan_sparse, planned_layers

PLANS = ("measure", "sparse", "dense")


def deploy_cuda(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    batch_size: int = 1,
    example_input: torch.Tensor | tuple | None = None,
    *,
    plan: str | os.PathLike = "measure",
    graph: bool = True,
    fold_bn: bool = True,
    fold: bool = True,
    lower_kxk: bool = True,
    max_shapes: int = MAX_SHAPES,
    reps: int = 20,
    backend=None,
    graphs=None,
    timer: Timer | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """An inference copy of the masked ``model`` whose 2:4 layers run cuSPARSELt, and whose other sparse layers
    (constant fan-in) run condensed Triton kernels, where that is faster.

    ``dtype``: ``torch.bfloat16`` / ``torch.float16`` / ``torch.float32``; ``None`` keeps the model's dtype;
    in fp32 2:4 layers stay dense (2:4 tensor cores need 16-bit types; the report says so) while constant
    fan-in layers still run condensed (the kernels take any float type). ``plan``: ``"measure"`` (time
    each layer's forms, then the whole model; never slower than the original dense model graphed the same
    way), ``"sparse"`` (every eligible layer sparse, no timing), ``"dense"`` (the deployed all-dense twin),
    or the path of a plan written by :func:`~.plan_io.save_plan` (no timing, no algorithm search).
    ``graph``: replay CUDA graphs, one per input shape up to ``max_shapes`` (then eager); ``False`` runs
    eagerly. ``lower_kxk``: also time k x k convs lowered to 2:4 GEMMs (per tap, im2col). ``fold``: remove
    the ablated neurons of a Linear followed (in an ``nn.Sequential``) by elementwise modules and another
    Linear, as ``ss.deploy(device="cpu")`` does; ``deployed.semisparse_plan["folded_ablated"]`` counts them.
    The rest is for tests and other back-ends (see the module docstring).
    """
    from .plan_io import load_plan_into, read_plan

    saved = None
    if isinstance(plan, (os.PathLike, Path)) or (isinstance(plan, str) and plan not in PLANS):
        if not Path(plan).is_file():
            raise SemisparseError(f"plan must be one of {', '.join(PLANS)} or a saved plan file; got {str(plan)!r}")
        saved = read_plan(plan)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SemisparseError(f"batch_size must be a positive int, got {batch_size!r}")
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise SemisparseError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16; got {dtype!r}")
    if backend is None:
        backend = require_cusparselt()
        device = "cuda" if device is None else device
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if graphs is None and graph:
        graphs = CudaGraphs() if device.type == "cuda" else EmulatedGraphs()
    if timer is None:
        from ..timing import GraphTimer, WallTimer

        timer = GraphTimer(reps) if device.type == "cuda" else WallTimer(max(3, reps // 4))
    if not any(True for _ in sparse_weights(model)):
        raise SemisparseError("model holds no semisparse masks; call ss.sparsify(model, ...) or ss.load(path) first")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if saved is not None:
        from .plan_io import check_environment

        planned_dtype = saved.header.get("summary", {}).get("dtype")
        if planned_dtype not in (None, str(dtype).removeprefix("torch.")):
            raise SemisparseError(f"saved plan {plan} was made for {planned_dtype}, not {dtype}; pass that dtype")
        check_environment(saved, backend)

    m, masks, patterns = detached_copy(model)  # masks multiplied in: a layer reached outside its name is masked
    original = copy.deepcopy(m)  # the original dense model: masks multiplied in, nothing else changed
    dropped = {}
    if fold:
        dropped = fold_ablated(m, masks)
    folded = []
    if fold_bn:
        folded = fold_batchnorm(m, masks)
    specs, baked = _collect(m, masks, patterns)
    channels_last = any(isinstance(mod, nn.Conv2d) for mod in m.modules())
    fmt = torch.channels_last if channels_last else None
    for mod in (m, original):
        mod.to(device=device, dtype=dtype)
        if fmt is not None:
            mod.to(memory_format=fmt)
    skip = () if lower_kxk else ("cusparselt-taps", "cusparselt-im2col")
    for name, spec in specs:
        spec.weight = spec.weight.to(device=device, dtype=dtype)
        if spec.weight.dim() == 4 and fmt is not None:
            spec.weight = spec.weight.contiguous(memory_format=fmt)
        spec.bias = None if spec.bias is None else spec.bias.to(device=device, dtype=dtype)
        only = None if saved is None else saved.forms_for(spec.key)
        layer = PlannedLayer(spec, saved.backend_for(backend, spec.key) if saved else backend, only=only, skip=skip)
        old = m.get_submodule(name) if name else m
        m = replace_everywhere(m, registered_names(m)[id(old)], carry_hooks(old, layer))

    x = example_input if example_input is not None else default_example_input(model, batch_size)
    x = _to_device(x, device, dtype, fmt)
    from .plan_io import environment

    summary: dict = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "backend": backend.describe(),
                     "environment": environment(backend),
                     "graph": bool(graph), "max_shapes": max_shapes if graph else 0,
                     "plan": str(plan) if saved is None else "loaded", "batch_size": batch_size,
                     "input_shape": list(x.shape) if isinstance(x, torch.Tensor) else None,
                     "folded_bn": len(folded), "folded_ablated": dropped,
                     "memory_format": "channels_last" if fmt else "contiguous"}
    if baked:
        summary["kept_dense"] = baked
    serve: nn.Module = m
    try:
        if saved is not None:
            load_plan_into(m, saved)
            summary["model"] = saved.header.get("summary", {}).get("model")
            if (summary["model"] or {}).get("fallback"):
                serve = original  # the planner found nothing faster than the original: serve it again
            with torch.no_grad():
                run_once(m, x)  # searches the alg ids a changed environment made stale, outside any capture
        elif plan == "sparse":
            plan_sparse(m)
            with torch.no_grad():
                run_once(m, x)
        elif plan == "measure":
            plan_layers(m, x, timer)
            result = plan_model(m, x, timer, original)
            summary["model"] = result
            if result["fallback"]:
                serve = original
        if isinstance(x, torch.Tensor):
            with torch.no_grad():
                summary["macs"] = mac_shares(m, x)
            if serve is not m:  # the original dense model is served: nothing runs sparse
                summary["macs"].update(by_form={"original": 1.0}, condensed=0.0)
        for _, layer in planned_layers(m):
            layer.drop_unused()
    except RuntimeError as exc:
        if example_input is not None:
            raise
        raise SemisparseError(f"could not run the model on a guessed input of shape {tuple(x.shape)} ({exc}); "
                              "pass example_input=torch.randn(...) with the model's real input shape") from exc
    summary["sparse_layers"] = sum(1 for _, lay in planned_layers(m) if lay.is_sparse)
    summary["layers"] = len(planned_layers(m))
    out = GraphedModule(serve, graphs if graph else None, dtype=dtype, device=device, memory_format=fmt,
                        max_shapes=max_shapes)
    if serve is not m:
        out.deployed = m  # kept for the report: what was planned and why it was not served
    if graph and isinstance(x, torch.Tensor):
        out.capture(x)
    out.semisparse_plan = summary
    return out


def run_once(model: nn.Module, x) -> None:
    model(*x) if isinstance(x, (list, tuple)) else model(x)


def _to_device(x, device, dtype, fmt):
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device, dtype, fmt) for v in x)
    if not isinstance(x, torch.Tensor):
        return x
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    return x.contiguous(memory_format=fmt) if (fmt is not None and x.dim() == 4) else x


def _collect(m: nn.Module, masks: dict, patterns: dict) -> tuple[list[tuple[str, LayerSpec]], dict[str, str]]:
    """Specs of every masked layer deploy rebuilds (masks already multiplied in); masked weights it cannot
    rebuild stay in their module, returned with the reason."""
    specs: list[tuple[str, LayerSpec]] = []
    kept: dict[str, str] = {}

    def key_of(name, p):
        return f"{name}.{p}" if name else p

    def spec(key, kind, weight, bias, conv=None):
        w = weight.detach().float() * masks[key]
        b = None if bias is None else bias.detach().float()
        return LayerSpec(key, kind, w, masks[key], b, patterns[key], conv or {})

    names = registered_names(m)
    for name, mod, keys in masked_layers(m, masks):
        if isinstance(mod, nn.MultiheadAttention):
            key, out_key = key_of(name, "in_proj_weight"), key_of(name, "out_proj.weight")
            why = why_not_plain(mod) or unsupported_reason(mod)
            if not why and not mod._qkv_same_embed_dim:
                why = "MultiheadAttention with separate q/k/v projections (kdim/vdim): kept as torch's module"
            if why or key not in masks:
                for k in keys:
                    kept[k] = why or "MultiheadAttention with a dense packed QKV: kept as torch's module"
                continue
            if not name:
                raise SemisparseError("deploy(device='cuda') cannot rebuild a bare nn.MultiheadAttention; "
                                      "wrap it in a model")
            new = carry_hooks(mod, SparseMultiheadAttention(mod, out_proj=nn.Identity(), in_proj=nn.Identity()))
            replace_everywhere(m, names[id(mod)], new)
            specs.append((key_of(name, "in_proj"), spec(key, "MultiheadAttention", mod.in_proj_weight,
                                                        mod.in_proj_bias)))
            if out_key in masks:
                specs.append((key_of(name, "out_proj"), spec(out_key, "Linear", mod.out_proj.weight,
                                                             mod.out_proj.bias)))
            else:
                plain = nn.Linear(mod.embed_dim, mod.embed_dim, bias=mod.out_proj.bias is not None)
                plain.load_state_dict(mod.out_proj.state_dict())
                new.out_proj = plain
            continue
        key = keys[0]
        why = why_not_plain(mod)
        if not why and isinstance(mod, nn.Linear):
            specs.append((name, spec(key, "Linear", mod.weight, mod.bias)))
        elif not why and isinstance(mod, nn.Conv2d):
            conv = {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation, "groups": mod.groups}
            specs.append((name, spec(key, "Conv2d", mod.weight, mod.bias, conv)))
        else:
            kept[key] = why or f"{type(mod).__name__}: only Linear, Conv2d and MHA are rebuilt on CUDA"
    return specs, kept


__all__ = ["deploy_cuda", "EmulatedBackend", "EmulatedGraphs"]
