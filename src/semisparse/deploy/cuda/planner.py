"""The GPU planner: a sparse form only where it beats dense under the same conditions; never slower.

1. Every :class:`~.layer.PlannedLayer` is timed in each of its forms on the very input it receives in one
   forward of the example input (planned batch, deploy dtype, same memory format), each form run by the
   same timer (CUDA graphs: no host overhead on either side). Its first eager call searches cuSPARSELt's
   algorithm id. The fastest form is kept; ``ratio`` is the best dense form's time over the chosen one's.
2. The whole model is timed as deployed, with every layer in its best dense form (same rebuilt attention,
   padding, folding), and as the original dense model; while the deployed model is slower than either,
   sparse layers go back to dense, smallest measured gain first. If even the all-dense deployed model
   is slower than the original, :func:`plan_model` says so (``"fallback": True``) and deploy serves the
   original dense model: a deployed model is never slower than its graphed dense twin.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .layer import PlannedLayer, is_sparse_form

Timer = Callable[[Callable[[], object], tuple], float]


def planned_layers(model: nn.Module) -> list[tuple[str, PlannedLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PlannedLayer)]


def capture_inputs(model: nn.Module, example_input) -> dict[str, torch.Tensor]:
    """The input each planned layer sees in one forward of ``example_input`` (hooks removed after)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in planned_layers(model):
        def hook(mod, args, name=name):
            seen.setdefault(name, args[0].detach())
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return seen


def run(model: nn.Module, example_input):
    if isinstance(example_input, (list, tuple)):
        return model(*example_input)
    return model(example_input)


def layer_macs(layer: PlannedLayer, x: torch.Tensor) -> int:
    """Multiply-adds of the layer's dense GEMM for input ``x`` (``(..., in)`` or ``(N, C, H, W)``)."""
    if len(layer.shape) == 2:
        return x.numel() // x.shape[-1] * layer.shape[0] * layer.shape[1]
    form = layer.forms["dense"]
    with torch.no_grad():
        out = form(x[:1])
    return x.shape[0] * out[0].numel() * math.prod(layer.shape[1:])


def plan_layers(model: nn.Module, example_input, timer: Timer) -> None:
    """Time every form of every planned layer on its real input; keep the fastest (dense on ties)."""
    inputs = capture_inputs(model, example_input)
    with torch.no_grad():
        for _, layer in planned_layers(model):
            x = inputs.get(_)
            if x is None:
                layer.figures = {"why": "not reached by the example input"}
                continue
            layer._macs = layer_macs(layer, x)
            if not layer.sparse_forms:
                continue
            times = {}
            for name, form in layer.forms.items():
                form(x)  # eager first call: cuSPARSELt's algorithm search happens here, outside any capture
                times[name] = timer(lambda form=form, x=x: form(x), ("layer", layer.key, name))
            dense = [n for n in times if not is_sparse_form(n)]
            sparse = [n for n in times if is_sparse_form(n)]
            best_dense = min(dense, key=times.__getitem__)
            best_sparse = min(sparse, key=times.__getitem__)
            layer.dense_choice = best_dense
            layer.timings = {n: round(t * 1e6, 2) for n, t in times.items()}
            ratio = times[best_dense] / max(times[best_sparse], 1e-12)
            layer.figures = {"dense_us": round(times[best_dense] * 1e6, 2),
                             "sparse_us": round(times[best_sparse] * 1e6, 2), "ratio": round(ratio, 3)}
            if times[best_sparse] < times[best_dense]:
                layer.choose(best_sparse)
            else:
                layer.choose(best_dense)
                layer.figures["why"] = f"dense faster: {best_sparse} {ratio:.2f}x of {best_dense}"


def plan_model(model: nn.Module, example_input, timer: Timer, original: nn.Module | None = None) -> dict:
    """Whole-model check after :func:`plan_layers` (see the module docstring). Returns the timings (ms),
    the layers reverted, and ``fallback`` (True: serve ``original``, nothing deployed was faster)."""
    lays = planned_layers(model)

    def chosen() -> frozenset:
        return frozenset(m.key for _, m in lays if m.is_sparse)

    def time_deployed() -> float:
        return timer(lambda: run(model, example_input), ("model", "deployed", chosen()))

    with torch.no_grad():
        t_dep = time_deployed()
        saved = [(m, m.choice) for _, m in lays]
        for _, m in lays:
            m.choose(m.dense_choice)
        t_all_dense = timer(lambda: run(model, example_input), ("model", "all-dense", frozenset()))
        for m, c in saved:
            m.choose(c)
        t_orig = math.inf if original is None else timer(lambda: run(original, example_input), ("model", "original",
                                                                                                  frozenset()))
        ref = min(t_all_dense, t_orig)
        t_first = t_dep
        reverted: list[str] = []
        order = sorted((m for _, m in lays if m.is_sparse), key=lambda m: m.figures.get("ratio", 1.0))
        while t_dep > ref and order:
            cut = max(1, len(order) // 4)
            for m in order[:cut]:
                m.choose(m.dense_choice)
                m.figures["why"] = "reverted: the whole model was not faster"
                reverted.append(m.key)
            order = order[cut:]
            t_dep = time_deployed() if order else t_all_dense
    fallback = t_dep > t_orig
    out = {"deployed_ms": round(t_dep * 1e3, 4), "first_deployed_ms": round(t_first * 1e3, 4),
           "all_dense_ms": round(t_all_dense * 1e3, 4), "reverted": reverted, "fallback": fallback}
    if original is not None:
        out["original_ms"] = round(t_orig * 1e3, 4)
        out["ratio_vs_original"] = round(t_orig / max(min(t_dep, t_orig), 1e-12), 3)
    out["ratio_vs_all_dense"] = round(t_all_dense / max(t_dep, 1e-12), 3)
    return out


def plan_sparse(model: nn.Module) -> None:
    """Without timing: every layer with a sparse form runs it (1x1/Linear GEMM, k x k by im2col first)."""
    preference = ("cusparselt", "cusparselt-im2col", "cusparselt-taps")
    for _, m in planned_layers(model):
        forms = m.sparse_forms
        if forms:
            m.choose(next((p for p in preference if p in forms), forms[0]))
