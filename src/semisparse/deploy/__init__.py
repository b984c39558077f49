"""Deploy: condensed sparse kernels and the measuring planner (the speed path).

``ss.deploy(model)`` reads the masks semisparse holds on ``model`` (``ss.sparsify`` / ``ss.load``; never the
zeros of a weight) and returns an inference copy in which every sparse Linear, Conv and MHA projection is
a condensed layer (:mod:`.condensed`) run by the kernels of :mod:`.kernels`, chosen layer by layer by the
planner (:mod:`.planner`).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..errors import SemisparseError
from ..masking.parametrization import detach, sparse_weights
from . import cpus, kernels
from .attention import SparseMultiheadAttention, supports
from .condensed import SparseConv, SparseLinear, deployed_layers
from .cuda import deploy_cuda
from .example import cast_example, default_example_input, describe_example
from .fold import bake, fold_ablated, fold_batchnorm, registered_names
from .kept import as_torch_layer
from .planner import plan_layers, plan_model, plan_pools, run
from .pool import MaxPool2d
from .pool import supports as supports_pool
from .transformer import deploy_transformers

__all__ = ["deploy", "deployed_layers", "default_example_input"]


def deploy(
    model: nn.Module,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    batch_size: int = 1,
    example_input: torch.Tensor | tuple | None = None,
    *,
    plan: str = "measure",
    fold: bool = True,
    fold_bn: bool = True,
    reps: int = 20,
    graph: bool = True,
) -> nn.Module:
    """A copy of ``model`` for inference whose sparse layers run condensed kernels; outputs equal the
    masked dense model's (for finite inputs: condensed layers compute the pruned layer, so NaN/Inf that only
    pruned weights would read do not propagate, :mod:`.condensed`). ``dtype=torch.bfloat16`` keeps condensed
    values in bf16 with fp32 accumulation; other dtypes, or bf16 without the kernels, run dense.

    ``model`` must hold semisparse masks (``ss.sparsify`` or ``ss.load``). ``plan``: ``"measure"`` (time
    every layer at ``example_input``, default ``batch_size`` inputs of the size the model records
    (``ss.load`` / training checkpoints: the size it was trained at), else ``(batch_size, C, 224, 224)``
    guessed from the first conv with a one-line warning; ``semisparse_plan["input_shape"]`` says which), keep
    dense where the kernel is not faster, then check the whole model is not slower than torch's dense model,
    NCHW or channels-last), ``"condensed"`` (every sparse layer condensed, no timing) or ``"dense"``.
    ``fold``: ablated neurons of a Linear that is followed (in an ``nn.Sequential``) only by elementwise
    modules and another Linear are removed, and the next Linear drops the matching input columns (their
    constant contribution goes into its bias).
    ``fold_bn``: every eval BatchNorm fed only by a Conv (sparse or dense) is folded into that conv's weight
    and bias and becomes ``nn.Identity`` (:mod:`.fold`; nothing folded if ``torch.fx`` cannot trace the model).
    Dense-mode layers run the best dense form the planner measured (a 1x1 conv may run as one matrix
    product, ``dense-gemm``), and each plain ``nn.MaxPool2d`` becomes :class:`.pool.MaxPool2d`, which runs
    semisparse's pooling kernel where the planner measured it faster than torch's. After ``"measure"``, a
    layer kept plain dense is torch's own module again (``nn.Linear``/``ConvNd`` subclasses that carry the
    planner's report row, :mod:`.kept`), pooling left to torch is ``nn.MaxPool2d``, and a model left with
    no semisparse code has no hooks: what it keeps dense costs what the original costs.
    ``deployed_layers`` lists the layers that run semisparse code.
    ``ss.report(deployed)`` shows each layer's kernel and measured ratio; ``deployed.semisparse_plan``
    holds the whole-model timing and the pooling choices.

    The result is in eval mode whatever mode ``model`` is in (``ss.load`` returns models in train mode):
    dropout off, BatchNorm on its running statistics; none of its parameters requires grad (``model``'s are
    untouched), so its outputs carry no autograd graph unless the input does. Each call of it (when it runs
    semisparse code) runs its kernels and its torch ops on no more threads than the CPUs the process may use
    at that moment (its CPU affinity, cgroup quota, and what other processes leave free: :mod:`.cpus`), since
    OpenMP threads beyond them spin-wait for each other; torch's thread count is as it was after the call.
    An ``example_input`` the model refuses, with any ``plan``, is a ``SemisparseError``; deployed layers
    refuse what the original layers refuse, with the same errors (inputs the kernels do not take run torch's
    own op).

    ``device="cuda"``: 2:4 layers through cuSPARSELt in CUDA graphs (``graph=False``: eager), planned on the
    GPU; ``plan`` may then also be ``"sparse"`` or a file written by ``semisparse.deploy.cuda.save_plan``
    (see :func:`semisparse.deploy.cuda.deploy_cuda`).
    """
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise SemisparseError(f"unknown device {str(device)[:40]!r}; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if torch.device(device).type == "cuda":
        return deploy_cuda(model, dtype, batch_size, example_input, plan=plan, graph=graph, fold_bn=fold_bn,
                           reps=reps, device=device)
    if plan not in ("measure", "condensed", "dense"):
        raise SemisparseError(f"plan must be 'measure', 'condensed' or 'dense', got {plan!r}")
    dev = torch.device(device)
    if dev.type != "cpu":
        raise SemisparseError(f"deploy supports device='cpu' (condensed kernels); got {device!r}")
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise SemisparseError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16; got {dtype!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SemisparseError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
        raise SemisparseError(f"reps must be a positive int (timed runs per candidate), got {reps!r}")
    if not any(True for _ in sparse_weights(model)):
        raise SemisparseError("model holds no semisparse masks; call ss.sparsify(model, ...) or ss.load(path) first")

    m = copy.deepcopy(model).cpu().eval()
    for p in m.parameters():  # an inference copy, as on CUDA: no autograd graph behind its outputs
        p.requires_grad_(False)
    found = {}
    for sw in list(sparse_weights(m)):
        mask = sw.parametrization.hard_mask().detach().to(torch.bool).clone()
        found[sw.key] = (sw.name, sw.param, mask, sw.parametrization.pattern_name)
    for sw in list(sparse_weights(m)):  # the dense originals, as plain inference weights
        detach(sw.module, sw.param)
    masks = {k: v[2] for k, v in found.items()}
    patterns = {k: v[3] for k, v in found.items()}
    folded_bn = fold_batchnorm(m, masks) if fold_bn else []
    # bf16: condensed values stored in bf16, accumulated in fp32 by the kernels; other dtypes run dense
    dense_dtype = dtype not in (None, torch.float32) and not (dtype == torch.bfloat16 and kernels.available())
    if dense_dtype:
        warnings.warn(f"semisparse: no {dtype} condensed kernels on this CPU; sparse layers run dense in {dtype}",
                      RuntimeWarning, stacklevel=2)
    dropped = fold_ablated(m, masks) if fold else {}

    m = _condense(m, masks, patterns)
    hooks = cpus.attach(m)  # before planning: the planner times the model as it will run
    for _, layer in deployed_layers(m):
        if layer.key in dropped:
            layer.figures["dropped_inputs"] = dropped[layer.key]

    summary: dict = {"plan": plan, "batch_size": batch_size, "threads": torch.get_num_threads(),
                     "usable_cpus": cpus.usable(), "kernels": kernels.available(), "simd_bits": kernels.simd_width(),
                     "folded_bn": len(folded_bn)}
    if dense_dtype:
        for _, layer in deployed_layers(m):
            layer.set_mode("dense")
        m.to(dtype)
        plan = "dense"
    elif dtype == torch.bfloat16:
        m.to(dtype)
    if example_input is not None and plan != "measure":
        _check_example(m, cast_example(example_input, dtype))
    if plan == "dense":
        for _, layer in deployed_layers(m):
            layer.set_mode("dense")
        for pool in m.modules():
            if isinstance(pool, MaxPool2d):
                pool.use_kernel = False
    elif plan == "measure":
        if example_input is not None:
            _check_example(m, cast_example(example_input, dtype))
        x = example_input if example_input is not None else default_example_input(model, batch_size, warn=True)
        x = cast_example(x, dtype)
        # what the timings and ratios are for (ss.report says so, and warns when counting at another shape)
        summary["input_shape"] = list(x.shape) if isinstance(x, torch.Tensor) else describe_example(x)
        try:
            with cpus.fitted_threads():  # each layer timed on the CPUs the model will run on
                plan_layers(m, x, reps=reps)
                pools = plan_pools(m, x, reps=reps)
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
        if summary.get("channels_last"):  # the planner measured torch's channels-last dense model fastest
            m = m.to(memory_format=torch.channels_last)
        # The thread hooks stay even where every layer is torch's own (a microsecond or two a call): without them
        # a layer kept dense runs torch's full thread count on a busy machine and stalls (50x on 2 busy CPUs).
        summary["thread_hooks"] = bool(hooks)
    for _, layer in deployed_layers(m):
        layer.drop_unused()
    m.semisparse_plan = summary
    return m


def _kept_dense_to_torch(m: nn.Module) -> tuple[nn.Module, int]:
    """Every layer the planner kept plain dense becomes torch's own module (:mod:`.kept`), and pooling it left
    to torch ``nn.MaxPool2d``, under every name; returns the root and how many layers were replaced. An
    attention module's projections stay as they are (it calls them as its own parts)."""
    inside_mha = {id(c) for mod in m.modules() if isinstance(mod, SparseMultiheadAttention)
                  for c in mod.modules() if c is not mod}
    names = registered_names(m)
    replaced = 0
    for _, layer in deployed_layers(m):
        if layer.mode == "dense" and not layer.dense_gemm and id(layer) not in inside_mha:
            m = _replace_everywhere(m, names[id(layer)], as_torch_layer(layer))
            replaced += 1
    for pool in [p for p in m.modules() if isinstance(p, MaxPool2d) and not p.use_kernel]:
        plain = nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices,
                             pool.ceil_mode)
        plain.train(pool.training)
        m = _replace_everywhere(m, names[id(pool)], plain)
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


def _condense(m: nn.Module, masks: dict, patterns: dict) -> nn.Module:
    """Replace every masked Linear, Conv and MHA (and plain max pooling) of ``m`` by its deployed form,
    under every name it is registered at (a module reached by two names stays one module); returns the root."""
    handled = set()
    names = registered_names(m)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            keys = [prefix + p for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                                         "out_proj.weight")]
            handled.update(keys)
            if not any(k in masks for k in keys):
                continue
            if supports(mod):  # F.multi_head_attention_forward reads the weights directly: bake the masks
                for k in keys:
                    owner, _, param = k[len(prefix):].rpartition(".")
                    bake(mod.get_submodule(owner) if owner else mod, param, masks.get(k))
                continue
            new = SparseMultiheadAttention.from_module(mod, prefix, masks, patterns)
            m = _replace_everywhere(m, names[id(mod)], new)
    names = registered_names(m)
    for name, mod in list(m.named_modules()):
        key = f"{name}.weight" if name else "weight"
        if key not in masks or key in handled:
            continue
        if isinstance(mod, nn.Linear):
            new = SparseLinear(key, mod.weight.detach(), masks[key], mod.bias, patterns[key])
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode == "zeros":
            new = SparseConv(key, mod, mod.weight.detach(), masks[key], mod.bias, patterns[key])
        else:
            bake(mod, "weight", masks[key])
            continue
        m = _replace_everywhere(m, names[id(mod)], new)
    names = registered_names(m)
    for mod in list(m.modules()):
        if supports_pool(mod):
            m = _replace_everywhere(m, names[id(mod)], MaxPool2d.from_module(mod))
    return deploy_transformers(m)


def _replace_everywhere(root: nn.Module, names: list[str], new: nn.Module) -> nn.Module:
    """Put ``new`` at each of ``names`` (all the names one module is registered under); returns the
    (possibly new) root."""
    for name in names:
        if not name:
            return new
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
    return root
