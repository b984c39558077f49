"""The measuring planner: keep a condensed kernel only where it beats dense on this machine, at this batch.

Each condensed layer is timed on the very input it receives in one forward of the example input, in
both modes (its condensed kernel, and the masked dense weight through torch), as the deployed model calls it
(its kernel call bound once, not per timed call), medians over repeated rounds; the faster mode is kept, and
the spread of the rounds says how sure that was. Then the whole model is timed against its all-dense self: if
the deployed model is not faster, layers are turned back to dense from the smallest measured gain up until it
is (at worst every layer is dense again, so a deployed model is never slower than dense), and a CNN is timed
against torch's channels-last dense model too, which it becomes where that is faster.
"""

from __future__ import annotations

import copy
import functools
import statistics
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from .. import timing
from ..timing import interleaved_medians, run
from . import batches
from .layers import SparseConv, SparseLinear, deployed_layers
from .pool import MaxPool2d
from .verify import difference


def capture_inputs(model: nn.Module, example_input, modules: list[tuple[str, nn.Module]] | None = None
                   ) -> dict[str, torch.Tensor]:
    """The input each of ``modules`` (default: the condensed layers) sees in one forward of ``example_input``."""
    return timing.capture_inputs(model, example_input, deployed_layers(model) if modules is None else modules)


def setting_name(v: dict) -> str:
    """A kernel setting for reports: ``{"block": 32, "pairs": True, "tile_kb": 0}`` -> ``"32,pairs"``."""
    parts = []
    for key, val in v.items():
        if key in ("block", "panel_width", "gemv_variant"):
            parts.append(str(val))
        elif key == "tile_kb" and val:
            parts.append(f"tiles{val}K")
        elif val is True:
            parts.append({"transposed_out": "transposed"}.get(key, key))
    return ",".join(parts)


#: Fewest calls per candidate and round once a round's time budget is spent: long calls (batch 32: 10-100 ms
#: a layer) vary little from call to call, and the rounds still take their median.
_MIN_REPS = 3

#: Attributes where a condensed layer keeps its kernel call bound to its tensors (built on first call).
_BINDINGS = ("_bound_gemv", "_fast_conv")


def candidate(layer: nn.Module, mode: str, v: dict, x: torch.Tensor) -> Callable[[], object]:
    """A call of ``layer`` on ``x`` in ``mode`` with setting ``v``, as the deployed model makes it: the kernel
    call a condensed layer binds on its first call is kept for this candidate across the switches of mode and
    setting between calls (binding checks the indices: ~0.7 ms on a 3072->768 layer, 20x the call it binds, which
    a deployed model pays once, not per call)."""
    bound: dict = {}

    def fn():
        layer.mode = mode
        layer.use_variant(v)  # forgets the binding of the previous candidate
        if bound:
            layer.__dict__.update(bound)
        y = layer(x)
        if mode == "condensed":
            bound.update({k: b for k in _BINDINGS if (b := layer.__dict__.get(k)) is not None})
        return y

    return fn


def plan_layers(model: nn.Module, example_input, reps: int = 20, budget_s: float = 0.5, rounds: int = 3,
                max_rounds: int = 7, prune: float | None = 1.25, first_share: float = 1 / 3) -> None:
    """Time every condensed layer both ways on its real input and keep the faster mode.

    The candidates are timed call by call interleaved (:func:`interleaved_medians`) in ``rounds`` rounds; each
    candidate's time is its median over the rounds it ran in, and the faster of the best dense and the best
    condensed is kept. Each round also gives a ratio (best dense over best condensed); where the rounds disagree
    (some say dense, some condensed), two more rounds are run, up to ``max_rounds``: a choice a busy machine
    could flip is measured longer. ``prune``: after the first round only the two fastest candidates of each side
    (dense, condensed) are timed again, the second only if within this factor of the first (None: every
    candidate every round): the later rounds decide between close candidates at half the cost, which with
    fewer calls per round for long calls halves planning at batch 32. ``first_share``: the first round, which
    only ranks, gets this share of a later round's time budget per candidate (long calls: ViT-B/16's Linears
    take 4-6 ms, and 8 candidates x 20 calls made the first round half of a 100 s plan; calls under ~3 ms
    still get all ``reps``). ``layer.figures`` records the ratio
    against torch's own layer, the spread of the rounds' ratios (``[lowest, highest]``), whether every round
    agreed (``sure``) and how many candidates each round timed (``timed``)."""
    inputs = capture_inputs(model, example_input)
    # a bar on a terminal only (tqdm's disable=None): planning ResNet-50 takes 25 s at batch 1, minutes at 32
    layers = tqdm(deployed_layers(model), desc="semisparse: timing layers", unit="layer", leave=False, disable=None,
                  dynamic_ncols=True)
    with torch.no_grad():
        for name, layer in layers:
            x = inputs.get(name)
            if x is None:
                layer.set_mode("dense")
                layer.figures = {"why": "not reached by the example input"}
                continue
            if layer.mode != "condensed":
                layer.figures = {"why": "fast kernels unavailable or dtype not fp32"}
                continue
            dense_vs = layer.dense_variants(x)
            sparse_vs = layer.variants(x)
            fns = [candidate(layer, "dense", v, x) for v in dense_vs] + \
                [candidate(layer, "condensed", v, x) for v in sparse_vs]
            nd = len(dense_vs)
            per_round = _timed_rounds(fns, nd, reps, budget_s / rounds, rounds, max_rounds, prune, first_share)
            # a candidate left out after the first round has one figure, not a median over rounds: it cannot win
            medians = {i: statistics.median(r[i] for r in per_round) for i in per_round[-1]}
            ratios = [_side_best(r, nd, True) / max(_side_best(r, nd, False), 1e-12) for r in per_round]
            t_torch = statistics.median(r[0] for r in per_round if 0 in r)  # the reference every ratio is against
            i_dense = min((i for i in medians if i < nd), key=medians.__getitem__)
            i_sparse = min((i for i in medians if i >= nd), key=medians.__getitem__)
            t_dense, dense_best = medians[i_dense], dense_vs[i_dense]
            t_sparse, best = medians[i_sparse], sparse_vs[i_sparse - nd]
            layer.set_mode("condensed")
            layer.use_variant(best)
            path = ""
            if isinstance(layer, SparseLinear):
                path = "gemv" if x.reshape(-1, layer.in_features).shape[0] == 1 else "spmm"
            elif isinstance(layer, SparseConv):
                path = "spmm"
            if best:
                path += "/" + setting_name(best)
            layer.path = path
            layer.figures = {"dense_us": round(t_torch * 1e6, 1), "sparse_us": round(t_sparse * 1e6, 1),
                             "ratio": round(t_torch / max(t_sparse, 1e-12), 2),
                             "spread": [round(min(ratios), 2), round(max(ratios), 2)],
                             "sure": _agree(per_round, nd), "rounds": len(per_round),
                             "timed": [len(r) for r in per_round]}
            if nd > 1:
                layer.figures["dense_best_us"] = round(t_dense * 1e6, 1)
            layer.use_variant(dense_best)  # what dense mode runs, now or if the whole-model check reverts
            layer.set_mode("condensed" if t_sparse < t_dense else "dense")


def _timed_rounds(fns: list[Callable[[], object]], nd: int, reps: int, budget_s: float, rounds: int,
                  max_rounds: int, prune: float | None, first_share: float = 1.0) -> list[dict[int, float]]:
    """Rounds of interleaved medians, ``{candidate index: seconds}`` each: the first round times every candidate
    (two warm-up calls each: binding, caches), later ones the two fastest of each side (dense, condensed) in the
    first round, the second only if within ``prune`` of the first (one warm-up call each: the bindings are kept),
    until ``rounds`` rounds agree on a side or ``max_rounds`` were run."""
    first = interleaved_medians(fns, reps, budget_s=budget_s * first_share, min_reps=_MIN_REPS)
    per_round = [dict(enumerate(first))]
    keep = list(range(len(fns)))
    if prune is not None:
        keep = []
        for side in (range(nd), range(nd, len(fns))):
            ranked = sorted(side, key=first.__getitem__)
            keep += [i for i in ranked[:2] if first[i] <= prune * first[ranked[0]]]
        keep.sort()
    more = rounds - 1
    while True:
        for _ in range(min(more, max(rounds, max_rounds) - len(per_round))):
            got = interleaved_medians([fns[i] for i in keep], reps, warmup=1, budget_s=budget_s,
                                      min_reps=_MIN_REPS)
            per_round.append(dict(zip(keep, got)))
        if len(per_round) >= max_rounds or _agree(per_round, nd):
            return per_round
        more = 2


def _side_best(r: dict[int, float], nd: int, dense: bool) -> float:
    """The fastest dense (``dense``) or condensed candidate of one round."""
    return min(t for i, t in r.items() if (i < nd) == dense)


def _agree(per_round: list[dict[int, float]], nd: int) -> bool:
    """Whether every round picked the same side (dense or condensed)."""
    sides = {_side_best(r, nd, True) <= _side_best(r, nd, False) for r in per_round}
    return len(sides) <= 1


def plan_pools(model: nn.Module, example_input, reps: int = 20, budget_s: float = 0.5) -> dict[str, dict]:
    """Time each deployed max pooling with semisparse's kernel and with torch's; keep the faster."""
    pools = [(n, m) for n, m in model.named_modules() if isinstance(m, MaxPool2d)]
    seen = capture_inputs(model, example_input, pools) if pools else {}
    out = {}
    with torch.no_grad():
        for name, pool in pools:
            x = seen.get(name)
            if x is None:
                pool.use_kernel = False
                continue

            def runner(flag, pool=pool, x=x):
                def fn():
                    pool.use_kernel = flag
                    return pool(x)
                return fn

            t_torch, t_kernel = interleaved_medians([runner(False), runner(True)], reps, budget_s=budget_s)
            pool.use_kernel = t_kernel < t_torch
            out[name] = {"torch_us": round(t_torch * 1e6, 1), "kernel_us": round(t_kernel * 1e6, 1),
                         "kernel": "semisparse" if pool.use_kernel else "torch"}
    return out


def plan_model(model: nn.Module, example_input, reps: int = 20, budget_s: float = 2.0) -> dict:
    """Whole-model check after :func:`plan_layers`: never slower than the all-dense model.

    Returns ``{"dense_ms", "deployed_ms", "ratio", "reverted"}``.
    """
    lays = deployed_layers(model)
    chosen = [(n, m) for n, m in lays if m.mode == "condensed"]
    pools = [m for m in model.modules() if isinstance(m, MaxPool2d)]
    split = batches.installed(model)  # the dense model a user would run takes the whole batch

    def timed_pair() -> tuple[float, float]:
        current = [(m, m.mode, m.dense_gemm) for _, m in lays]
        pooled = [(p, p.use_kernel) for p in pools]
        bound: dict[int, dict] = {}  # each condensed layer's bound kernel call, kept across the switches

        def restore():
            for m, mode, gemm in current:
                m.set_mode(mode)
                m.dense_gemm = gemm
                if mode == "condensed" and id(m) in bound:
                    m.__dict__.update(bound[id(m)])
            for p, flag in pooled:
                p.use_kernel = flag
            if split is not None:
                split.on = True

        def dense():  # torch's own layers and pooling: the model as it was, BatchNorm folded
            for _, m in lays:
                if m.mode == "condensed":
                    got = {k: b for k in _BINDINGS if (b := m.__dict__.get(k)) is not None}
                    if got:
                        bound[id(m)] = got
                m.set_mode("dense")
                m.dense_gemm = False
            for p in pools:
                p.use_kernel = False
            if split is not None:
                split.on = False
            return run(model, example_input)

        def deployed():
            restore()
            return run(model, example_input)

        t_d, t_s = interleaved_medians([dense, deployed], reps, budget_s=budget_s, min_reps=_MIN_REPS)
        restore()
        return t_d, t_s

    with torch.no_grad():
        t_dense, t_dep = timed_pair()
        reverted = []
        # Smallest measured gains first: those are where noise or the glue (packing, cropping) may lose.
        order = sorted(chosen, key=lambda nm: nm[1].figures.get("ratio", 1.0))
        while t_dep > t_dense and order:
            cut = max(1, len(order) // 4)
            for n, m in order[:cut]:
                m.set_mode("dense")
                m.figures["why"] = "reverted: whole model was not faster"
                reverted.append(n)
            order = order[cut:]
            t_dense, t_dep = timed_pair()
        if t_dep > t_dense:  # every layer is back to dense: torch's own pooling and dense layers, whole batches
            batches.uninstall(model)
            split = None
            for _, m in lays:
                if m.dense_gemm:
                    m.dense_gemm = False
                    reverted.append(m.key + " (gemm)")
            for p in pools:
                p.use_kernel = False
            t_dense, t_dep = timed_pair()
        t_cl = _channels_last_check(model, example_input, lays, pools, reps, budget_s)
    out = {"dense_ms": round(t_dense * 1e3, 3), "deployed_ms": round(t_dep * 1e3, 3),
           "ratio": round(t_dense / max(t_dep, 1e-12), 3), "reverted": reverted}
    if t_cl is not None:
        out["dense_channels_last_ms"] = round(t_cl[0] * 1e3, 3)
        out["ratio_vs_channels_last"] = round(t_cl[0] / max(t_cl[1], 1e-12), 3)
        if t_cl[2]:
            out["channels_last"] = True
            out["deployed_ms"] = round(t_cl[0] * 1e3, 3)
            out["ratio"] = round(t_dense / max(t_cl[0], 1e-12), 3)
            out["reverted"] += [n for n, m in lays if m.figures.get("why") == _CL_WHY]
    for _, m in lays:
        m.drop_unused()
    return out


_CL_WHY = "reverted: torch's channels-last dense model was faster"


def plan_batch(model: nn.Module, example_input, reps: int = 20, budget_s: float = 2.0) -> dict:
    """Whether ``model`` runs ``example_input``'s batch faster sample by sample (:mod:`.batches`) than whole,
    timed call by call interleaved; kept (installed) only where faster and where the outputs equal the whole
    batch's. Returns ``{"per_sample": bool, "whole_ms", "per_sample_ms"}``, or ``{"per_sample": False, "why"}``
    where it was not tried."""
    why = batches.why_not_split(model, example_input)
    if why:
        return {"per_sample": False, "why": why}
    split = batches.install(model)

    def whole():
        split.on = False
        return run(model, example_input)

    def per_sample():
        split.on = True
        return run(model, example_input)

    with torch.no_grad():
        why = difference(per_sample(), whole(), rtol=1e-5)  # the same kernels: only torch's own ops may round
        if why:
            batches.uninstall(model)
            return {"per_sample": False, "why": f"sample by sample, {why.replace('the masked model', 'the batch')}"}
        t_whole, t_split = interleaved_medians([whole, per_sample], reps, budget_s=budget_s, min_reps=_MIN_REPS)
    split.on = True
    if t_split >= t_whole:
        batches.uninstall(model)
    return {"per_sample": t_split < t_whole, "whole_ms": round(t_whole * 1e3, 3),
            "per_sample_ms": round(t_split * 1e3, 3)}


def channels_last_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a model kept dense in channels-last form: a 4-D input goes in channels-last."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def _channels_last_check(model: nn.Module, example_input, lays: list, pools: list, reps: int,
                         budget_s: float) -> tuple[float, float, bool] | None:
    """The model all dense with weights and input channels-last (oneDNN's NHWC convolutions, often torch's fastest
    dense CNN on CPU) timed against the model as planned; where it is faster, the model becomes it (every layer
    dense, torch's pooling, channels-last weights and an input hook), so a deployed CNN is never slower than the
    strongest dense form torch has. Returns ``(channels-last s, deployed s, adopted)``; None for a model without
    2-D convolutions or a 4-D tensor input."""
    if not (isinstance(example_input, torch.Tensor) and example_input.dim() == 4
            and any(isinstance(m, (nn.Conv2d, SparseConv)) for m in model.modules())):
        return None
    cl = copy.deepcopy(model)
    batches.uninstall(cl)  # torch's dense model takes the whole batch
    for _, m in deployed_layers(cl):
        m.set_mode("dense")
        m.dense_gemm = False
    for p in cl.modules():
        if isinstance(p, MaxPool2d):
            p.use_kernel = False
    cl = cl.to(memory_format=torch.channels_last)
    xc = example_input.contiguous(memory_format=torch.channels_last)
    t_cl, t_dep = interleaved_medians([functools.partial(cl, xc), lambda: run(model, example_input)], reps,
                                      budget_s=budget_s, min_reps=_MIN_REPS)
    if t_cl >= t_dep:
        return t_cl, t_dep, False
    for _, m in lays:
        if m.mode == "condensed":
            m.figures["why"] = _CL_WHY
        m.set_mode("dense")
        m.dense_gemm = False
    for p in pools:
        p.use_kernel = False
    batches.uninstall(model)
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(channels_last_input)
    return t_cl, t_dep, True
