"""The GPU planner: a sparse form only where it beats dense under the same conditions; never slower.

1. Every :class:`~.layer.PlannedLayer` is timed in each of its forms on the very input it receives in one
   forward of the example input (planned batch, deploy dtype, same memory format), each form run by the
   same timer (CUDA graphs: no host overhead on either side). Its first eager call searches cuSPARSELt's
   algorithm id. A tunable form (the condensed Triton kernels) is timed once per kernel config, each a
   candidate; the fastest config whose output matches the dense form's stands for the form (:func:`tune`).
   The fastest form is kept; ``ratio`` is the best dense form's time over the chosen one's.
2. The whole model is timed as deployed, with every layer in its best dense form (same rebuilt attention,
   padding, folding), and as the original dense model; while the deployed model is slower than either,
   sparse layers go back to dense, smallest measured gain first. If even the all-dense deployed model
   is slower than the original, :func:`plan_model` says so (``"fallback": True``) and deploy serves the
   original dense model: a deployed model is never slower than its graphed dense twin.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import timing
from ..timing import Timer, run
from .layers import PlannedLayer, is_sparse_form


def planned_layers(model: nn.Module) -> list[tuple[str, PlannedLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PlannedLayer)]


def capture_inputs(model: nn.Module, example_input) -> dict[str, torch.Tensor]:
    """The input each planned layer sees in one forward of ``example_input``."""
    return timing.capture_inputs(model, example_input, planned_layers(model))


def layer_macs(layer: PlannedLayer, x: torch.Tensor) -> int:
    """Multiply-adds of the layer's dense GEMM for input ``x`` (``(..., in)`` or ``(N, C, H, W)``)."""
    if len(layer.shape) == 2:
        return x.numel() // x.shape[-1] * layer.shape[0] * layer.shape[1]
    with torch.no_grad():
        out = layer(x[:1])
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
                if is_tunable(form):
                    t = tune(layer, name, form, x, timer)
                    if t is not None:
                        times[name] = t
                    continue
                form(x)  # eager first call: cuSPARSELt's algorithm search happens here, outside any capture
                times[name] = timer(lambda form=form, x=x: form(x), ("layer", layer.key, name))
            dense = [n for n in times if not is_sparse_form(n)]
            sparse = [n for n in times if is_sparse_form(n)]
            if not sparse:
                continue
            best_dense = min(dense, key=times.__getitem__)
            best_sparse = min(sparse, key=times.__getitem__)
            layer.dense_choice = best_dense
            layer.timings = {n: round(t * 1e6, 2) for n, t in times.items()}
            ratio = times[best_dense] / max(times[best_sparse], 1e-12)
            layer.figures = {"dense_us": round(times[best_dense] * 1e6, 2),
                             "sparse_us": round(times[best_sparse] * 1e6, 2), "ratio": round(ratio, 3)}
            chosen = layer.forms[best_sparse]
            config = chosen.config_json() if is_tunable(chosen) else None
            if config is not None:  # the best sparse form's kernel config (kept even where dense wins)
                layer.figures["config"] = getattr(getattr(chosen, "config", None), "name", None) or config_name(config)
            if times[best_sparse] < times[best_dense]:
                layer.choose(best_sparse)
            else:
                layer.choose(best_dense)
                layer.figures["why"] = f"dense faster: {best_sparse} {ratio:.2f}x of {best_dense}"


def is_tunable(form: nn.Module) -> bool:
    """A form with kernel configs to choose from (``candidates(x)``, ``use_config(cfg)``, ``config_json()``)."""
    return all(callable(getattr(form, a, None)) for a in ("candidates", "use_config", "config_json"))


def config_name(config: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in config.items())


#: Largest relative error (vs the layer's dense form, on its planning input) a timed kernel config may show
#: before the planner refuses it: a guard against a config the compiler gets wrong, not a precision test.
CONFIG_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def tune(layer: PlannedLayer, name: str, form: nn.Module, x: torch.Tensor, timer: Timer,
         record: dict | None = None) -> float | None:
    """Time every kernel config of a tunable form as a candidate (``("layer", key, form, config)``), keep the
    fastest whose output matches the dense form's; returns its time, or None when no config ran.
    ``record``, if given, receives ``{config name: seconds}`` of every config timed (the bench's rows)."""
    times: dict[int, float] = {}
    configs = form.candidates(x)
    failed: list[str] = []
    for i, cfg in enumerate(configs):
        form.use_config(cfg)
        label = getattr(cfg, "name", str(cfg))
        try:
            times[i] = timer(lambda: form(x), ("layer", layer.key, name, label))
        except Exception as exc:  # a config this GPU cannot compile or launch (resources): not a candidate
            failed.append(f"{label}: {type(exc).__name__}")
            continue
        if record is not None:
            record[label] = times[i]
    dense = layer.forms[layer.dense_choice] if layer.dense_choice in layer.forms else layer.forms["dense"]
    ref = dense(x)
    tol = CONFIG_TOL.get(x.dtype, 1e-3)
    for i in sorted(times, key=times.__getitem__):
        form.use_config(configs[i])
        got = form(x)
        err = float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
        if got.shape == ref.shape and err <= tol:
            if failed:
                layer.notes.append(f"{name}: configs that did not run: {', '.join(failed[:4])}")
            return times[i]
        failed.append(f"{getattr(configs[i], 'name', i)}: rel err {err:.1e}")
    form.use_config(None)
    layer.notes.append(f"{name}: no kernel config ran correctly ({'; '.join(failed[:4])})")
    return None


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


def mac_shares(model: nn.Module, example_input) -> dict:
    """MACs of the masked layers (per forward of ``example_input``) and the share that ran in each form;
    ``condensed``: the share of the sparse MACs that ran in a condensed kernel (the GPU targets' figure)."""
    lays = planned_layers(model)
    if any(m._macs is None for _, m in lays):
        inputs = capture_inputs(model, example_input)
        for n, m in lays:
            if m._macs is None and n in inputs:
                m._macs = layer_macs(m, inputs[n])
    per_form: dict[str, int] = {}
    for _, m in lays:
        per_form[m.choice] = per_form.get(m.choice, 0) + (m._macs or 0)
    total = sum(per_form.values())
    return {"sparse_macs": total, "by_form": {k: round(v / max(total, 1), 4) for k, v in sorted(per_form.items())},
            "condensed": round(sum(v for k, v in per_form.items() if "condensed" in k) / max(total, 1), 4)}


def plan_sparse(model: nn.Module) -> None:
    """Without timing: every layer with a sparse form runs it (1x1/Linear GEMM, k x k by im2col first;
    a tunable form runs its heuristic config)."""
    preference = ("cusparselt", "cusparselt-im2col", "cusparselt-taps")
    for _, m in planned_layers(model):
        forms = m.sparse_forms
        if forms:
            m.choose(next((p for p in preference if p in forms), forms[0]))
