"""``ss.deploy(model, device="cpu")``: the CPU build.

Read the masks off a detached copy (:func:`~semisparse.masking.parametrization.detached_copy`), fold
BatchNorm and ablated neurons (:mod:`..fold`), condense every plain masked layer (:mod:`.layers`, run by
:mod:`.kernels`), check the result against the masked model (:mod:`.verify`, undoing what changed it), then
plan layer by layer on this CPU (:mod:`.planner`) and give layers kept dense back to torch (:mod:`.kept`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ...errors import SemisparseError
from ...masking.coverage import LayerReport
from ...masking.parametrization import detached_copy, sparse_weights
from ..attention import SparseMultiheadAttention, unsupported_reason
from ..example import cast_example, default_example_input, describe_example
from ..fold import fold_ablated, fold_batchnorm
from ..plain import carry_hooks, why_not_plain
from ..swap import masked_layers, registered_names, replace_everywhere
from ..timing import run
from . import batches, cpus, kernels
from .kept import as_torch_layer
from .layers import SparseConv, SparseLinear, deployed_layers
from .planner import plan_batch, plan_layers, plan_model, plan_pools
from .pool import MaxPool2d, is_supported
from .transformer import deploy_transformers
from .verify import Checks, reference

__all__ = ["deploy_cpu"]


def deploy_cpu(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    batch_size: int = 1,
    example_input: torch.Tensor | tuple | None = None,
    *,
    plan: str = "measure",
    fold: bool = True,
    fold_bn: bool = True,
    reps: int = 20,
) -> nn.Module:
    """``ss.deploy(model, device="cpu")``: condensed layers on the C kernels, planned on this CPU (the whole
    contract is :func:`semisparse.runtime.deploy`'s)."""
    if plan not in ("measure", "condensed", "dense"):
        raise SemisparseError(f"plan must be 'measure', 'condensed' or 'dense', got {plan!r}")
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise SemisparseError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16; got {dtype!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SemisparseError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
        raise SemisparseError(f"reps must be a positive int (timed runs per candidate), got {reps!r}")
    if not any(True for _ in sparse_weights(model)):
        raise SemisparseError("model holds no semisparse masks; call ss.sparsify(model, ...) or ss.load(path) first")

    for sw in sparse_weights(model):
        others = [type(p).__name__ for p in sw.module.parametrizations[sw.param] if p is not sw.parametrization]
        if others:
            raise SemisparseError(
                f"{sw.key} carries {', '.join(others)} besides semisparse's mask; deploy reads plain masked weights: "
                "fold it into the weight first (torch.nn.utils.parametrize.remove_parametrizations(module, "
                f"{sw.param!r}, leave_parametrized=True) before ss.sparsify) and sparsify again")
    model_dtype = _model_dtype(model)
    if dtype is None and model_dtype != torch.float32:  # the model's own dtype: run in it
        if model_dtype not in (torch.float64, torch.bfloat16, torch.float16):
            raise SemisparseError(f"the model's weights are {model_dtype}; deploy runs float32, float64, bfloat16 "
                                  "or float16 models: pass dtype=torch.float32")
        dtype = model_dtype
    x = example_input if example_input is not None else default_example_input(model, batch_size,
                                                                              warn=plan == "measure")
    if example_input is None:
        x = cast_example(x, model_dtype)
    checks = None
    ref = reference(model)
    if example_input is None and plan != "measure":  # nothing timed: check on a small guess where it fits
        small = cast_example(default_example_input(model, batch_size, size=32), torch.float32)
        if small.shape != x.shape:
            try:
                checks = Checks(ref, small)
            except Exception:  # noqa: BLE001 - the model takes only its full size: checked on that below
                checks = None
    try:  # the masked model's outputs every rewrite is checked against (fp32: what the kernels compute)
        # a guessed input is full-size (224 x 224 for an image model): its second input keeps the shape
        if checks is None:
            checks = Checks(ref, cast_example(x, torch.float32), grow=example_input is not None)
    except Exception as exc:  # noqa: BLE001 - whatever the model raises on the input is the answer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if example_input is not None:
            raise SemisparseError(f"example_input {describe_example(x)} does not fit the model "
                                  f"({type(exc).__name__}: {first}); pass an input of the model's real shape "
                                  "and dtype") from exc
        if plan == "measure":
            raise SemisparseError(
                f"could not run the model on a guessed input of shape {tuple(x.shape)} ({type(exc).__name__}: "
                f"{first}); pass example_input=torch.randn(...) with the model's real input shape") from exc
        warnings.warn(f"semisparse: deployed unchecked: the model does not run on a guessed input of shape "
                      f"{tuple(x.shape)}; pass example_input=... to check it against the masked model",
                      RuntimeWarning, stacklevel=3)
    if checks is None:
        m, built = _build(model, fold_bn, fold)
        built["undone"] = []
    else:
        m, built = _verified(model, checks, fold_bn, fold)
    # bf16: condensed values stored in bf16, accumulated in fp32 by the kernels; other dtypes run dense
    dense_dtype = dtype not in (None, torch.float32) and not (dtype == torch.bfloat16 and kernels.available())
    if dense_dtype:
        warnings.warn(f"semisparse: no {str(dtype).removeprefix('torch.')} condensed kernels on this CPU; sparse "
                      f"layers run dense in {str(dtype).removeprefix('torch.')}"
                      + (" (the model's dtype; pass dtype=torch.float32 to run them condensed)"
                         if dtype == model_dtype else ""), RuntimeWarning, stacklevel=3)
    for note in built["undone"]:
        warnings.warn(f"semisparse: {note}", RuntimeWarning, stacklevel=3)
    dropped = built["dropped"]
    hooks = cpus.attach(m)  # before planning: the planner times the model as it will run
    for _, layer in deployed_layers(m):
        if layer.key in dropped:
            layer.figures["dropped_inputs"] = dropped[layer.key]

    summary: dict = {"plan": plan, "batch_size": batch_size, "threads": torch.get_num_threads(),
                     "usable_cpus": cpus.usable(), "kernels": kernels.available(), "simd_bits": kernels.simd_width(),
                     "folded_bn": len(built["folded_bn"]), "left_as_is": built["left"], "undone": built["undone"]}
    if dense_dtype:
        for _, layer in deployed_layers(m):
            layer.set_mode("dense")
        m.to(dtype)
        plan = "dense"
    elif dtype == torch.bfloat16:
        m.to(dtype)
    if example_input is not None and dtype is not None and dtype != torch.float32:  # checked in fp32 above
        _check_example(m, cast_example(example_input, dtype))
    if plan == "dense":
        for _, layer in deployed_layers(m):
            layer.set_mode("dense")
        for pool in m.modules():
            if isinstance(pool, MaxPool2d):
                pool.use_kernel = False
    elif plan == "measure":
        x = cast_example(x, dtype)
        # what the timings and ratios are for (ss.report says so, and warns when counting at another shape)
        summary["input_shape"] = list(x.shape) if isinstance(x, torch.Tensor) else describe_example(x)
        try:
            with cpus.fitted_threads():  # each layer timed on the CPUs the model will run on
                pools = _plan_layers_and_batch(m, x, reps, summary)
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
            if example_input is not None:
                raise
            raise SemisparseError(
                f"could not run the model on a guessed input of shape {tuple(x.shape)} ({exc}); pass "
                "example_input=torch.randn(...) with the model's real input shape"
            ) from exc
        summary.update(plan_model(m, x, reps=reps))
        for name, pool in m.named_modules():
            if name in pools:  # the whole-model check may have handed pooling back to torch
                pools[name]["kernel"] = "semisparse" if pool.use_kernel else "torch"
        if pools:
            summary["pools"] = pools
        m, summary["torch_layers"] = _kept_dense_to_torch(m)
        if "batch" in summary:  # a root that was itself a layer kept dense is torch's module now
            summary["batch"]["per_sample"] = batches.installed(m) is not None
        if summary.get("channels_last"):  # the planner measured torch's channels-last dense model fastest
            m = m.to(memory_format=torch.channels_last)
        # The thread hooks stay even where every layer is torch's own (a microsecond or two a call): without them
        # a layer kept dense runs torch's full thread count on a busy machine and stalls (50x on 2 busy CPUs).
        summary["thread_hooks"] = bool(hooks)
    for _, layer in deployed_layers(m):
        layer.drop_unused()
    if hooks:
        cpus.scriptable(m)
    m.semisparse_plan = summary
    return m


def _plan_layers_and_batch(m: nn.Module, x, reps: int, summary: dict) -> dict:
    """Plan the layers and pooling; a batch of images or sequences is first planned at one sample and timed
    whole against sample by sample (:func:`.planner.plan_batch`): where whole batches are faster, the layers are
    planned again at the batch they then see. Returns the pooling choices."""
    if batches.why_not_split(m, x):
        plan_layers(m, x, reps=reps)
        return plan_pools(m, x, reps=reps)
    modes = [(layer, layer.mode) for _, layer in deployed_layers(m)]
    plan_layers(m, x[:1], reps=reps)
    pools = plan_pools(m, x[:1], reps=reps)
    summary["batch"] = plan_batch(m, x, reps=reps)
    if summary["batch"]["per_sample"]:
        return pools
    for layer, mode in modes:
        layer.set_mode(mode)
    plan_layers(m, x, reps=reps)
    return plan_pools(m, x, reps=reps)


def _kept_dense_to_torch(m: nn.Module) -> tuple[nn.Module, int]:
    """Every layer the planner kept plain dense becomes torch's own module (:mod:`.kept`), and pooling it left
    to torch ``nn.MaxPool2d`` (its forward hooks carried), under every name; returns the root and how many
    layers were replaced. An attention module's projections stay as they are (it calls them as its own parts)."""
    inside_mha = {id(c) for mod in m.modules() if isinstance(mod, SparseMultiheadAttention)
                  for c in mod.modules() if c is not mod}
    names = registered_names(m)
    replaced = 0
    for _, layer in deployed_layers(m):
        if layer.mode == "dense" and not layer.dense_gemm and id(layer) not in inside_mha:
            m = replace_everywhere(m, names[id(layer)], as_torch_layer(layer))
            replaced += 1
    for pool in [p for p in m.modules() if isinstance(p, MaxPool2d) and not p.use_kernel]:
        m = replace_everywhere(m, names[id(pool)], carry_hooks(pool, pool.__prepare_scriptable__()))
    return m, replaced


def _runs_semisparse(m: nn.Module) -> bool:
    """Whether any of ``m``'s modules runs semisparse code (a deployed layer, attention, the pooling kernel)."""
    return any(isinstance(mod, (SparseLinear, SparseConv, SparseMultiheadAttention))
               or (isinstance(mod, MaxPool2d) and mod.use_kernel) for mod in m.modules())


def _check_example(m: nn.Module, x) -> None:
    """Run ``x`` through the deployed ``m`` once: an input the model refuses is a one-line SemisparseError."""
    try:
        with torch.no_grad():
            run(m, x)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SemisparseError(f"example_input {describe_example(x)} does not fit the model ({type(exc).__name__}: "
                              f"{first}); pass an input of the model's real shape and dtype") from exc


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating weight (float32 for a model without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _build(model: nn.Module, fold_bn: bool, fold: bool, keep: frozenset = frozenset()) -> tuple[nn.Module, dict]:
    """The deployed structure of ``model`` (every condensable layer condensed, fp32), with the folds asked
    for; layers whose keys are in ``keep`` stay torch's modules. Returns it and what was done."""
    m, masks, patterns = detached_copy(model)
    left: dict[str, str] = {}
    owners = {key: (name, mod) for name, mod, keys in masked_layers(m, masks) for key in keys}
    for key, (_, mod) in owners.items():
        why = why_not_plain(mod) or (unsupported_reason(mod) if isinstance(mod, nn.MultiheadAttention) else "")
        if not why and key in keep:
            why = "replacing it changed the model's output"
        if why:
            left[key] = why
    for key, (_, mod) in owners.items():  # one key of an MHA left: the whole MHA stays
        why = next((left[k] for k, (_, o) in owners.items() if o is mod and k in left), "")
        if why:
            left.setdefault(key, why)
    run = {k: v for k, v in masks.items() if k not in left}
    folded_bn = fold_batchnorm(m, run) if fold_bn else []
    dropped = fold_ablated(m, run) if fold else {}
    m = _condense(m, run, patterns)
    for key, why in left.items():  # the report's row of a layer left as is, with the reason
        owner = m.get_submodule(key.rpartition(".")[0]) if "." in key else m
        if owner.__dict__.get("semisparse_rows") is None:
            owner.semisparse_rows = []
        mask = masks[key]
        owner.semisparse_rows.append(LayerReport(key, type(owner).__name__, tuple(mask.shape), patterns[key],
                                                 float(mask.float().mean()), mask.numel(),
                                                 reason=f"left as is: {why}", extra={"kernel": "torch"}))
    return m, {"folded_bn": folded_bn, "dropped": dropped, "left": left, "units": sorted(run)}


def _verified(model: nn.Module, checks: Checks, fold_bn: bool, fold: bool) -> tuple[nn.Module, dict]:
    """:func:`_build`, checked against the masked model on ``checks``: a rewrite that changes the outputs is
    undone (the folds first, then the layers whose swap changes them, found by halving), and said why."""
    m, info = _build(model, fold_bn, fold)
    why = checks.mismatch(m)
    if not why:
        return m, {**info, "undone": []}
    undone = []
    folds = [("BatchNorm folding", (False, fold)), ("ablated-neuron removal", (fold_bn, False)),
             ("BatchNorm folding and ablated-neuron removal", (False, False))]
    for what, (fb, fa) in folds:
        if (fb, fa) == (fold_bn, fold):
            continue
        m2, info2 = _build(model, fb, fa)
        if not checks.mismatch(m2):
            return m2, {**info2, "undone": [f"{what} undone: the deployed model {why}"]}
    fold_bn = fold = False

    def fails(swapped: list[str]) -> str:
        return checks.mismatch(_build(model, False, False, frozenset(info["units"]) - set(swapped))[0])

    bad = _offenders(fails, info["units"])
    keep = frozenset(bad)
    m, info = _build(model, False, False, keep)
    why2 = checks.mismatch(m)
    if why2:  # together they still differ: every layer stays torch's
        keep = frozenset(info["units"]) | keep
        m, info = _build(model, False, False, keep)
        why2 = checks.mismatch(m)
        if why2:
            raise SemisparseError(f"the masked model's outputs cannot be reproduced even with every layer left "
                                  f"as it was (the deployed model {why2}): is its eval forward random?")
    undone.append(f"{len(keep)} layer(s) left as torch modules ({', '.join(sorted(keep)[:3])}"
                  f"{', ...' if len(keep) > 3 else ''}): with them condensed the deployed model {why}")
    return m, {**info, "undone": undone}


def _offenders(fails, units: list[str]) -> list[str]:
    """The units whose swap alone makes ``fails`` report a difference, found by halving; all of ``units``
    where only swapping them together does."""
    if not units or not fails(units):
        return []
    if len(units) == 1:
        return list(units)
    half = len(units) // 2
    bad = _offenders(fails, units[:half]) + _offenders(fails, units[half:])
    return bad or list(units)


def _condensed_projection(key: str, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                          pattern: str) -> SparseLinear:
    """An attention projection's condensed layer (:class:`~.attention.SparseMultiheadAttention`)."""
    return SparseLinear(key, weight, mask, bias, pattern, kind="MultiheadAttention")


def _condense(m: nn.Module, masks: dict, patterns: dict) -> nn.Module:
    """Replace every masked Linear, Conv and MHA in ``masks`` (and plain max pooling) of ``m`` by its deployed
    form, under every name it is registered at (a module reached by two names stays one module), its forward
    hooks carried over; returns the root. Modules of keys not in ``masks`` are left as they are."""
    names = registered_names(m)
    for name, mod, keys in masked_layers(m, masks):
        if isinstance(mod, nn.MultiheadAttention):
            new = SparseMultiheadAttention.from_module(mod, f"{name}." if name else "", masks, patterns,
                                                       _condensed_projection)
        elif isinstance(mod, nn.Linear):
            new = SparseLinear(keys[0], mod.weight.detach(), masks[keys[0]], mod.bias, patterns[keys[0]])
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode == "zeros":
            new = SparseConv(keys[0], mod, mod.weight.detach(), masks[keys[0]], mod.bias, patterns[keys[0]])
        else:
            continue
        m = replace_everywhere(m, names[id(mod)], carry_hooks(mod, new))
    names = registered_names(m)
    for mod in list(m.modules()):
        if is_supported(mod) and not (mod._backward_hooks or mod._backward_pre_hooks):
            m = replace_everywhere(m, names[id(mod)], carry_hooks(mod, MaxPool2d.from_module(mod)))
    return deploy_transformers(m)
