"""How long ``ss.deploy``'s measuring planner takes, and whether a cheaper planner setting changes what it plans.

``--compare prune``: leaving out candidates far behind after the first round (``plan_layers(prune=1.25)``, the
default) against timing every candidate in every round (``prune=None``); ``--compare first-share``: a first
round with a third of a later round's time budget (``first_share=1/3``, the default) against the full budget.
ResNet-50 at SRigL-like 90% constant fan-in (the anchors' masks; ``--pattern 2:4-rows4``: magnitude 2:4 shared
by blocks of 4 rows), 2 threads: the model deployed with each setting in one process, in alternating order over
``--repeats``; prints each planning time, the layers kept condensed, where the two plans differ and
(``--repeats 2`` or more) how much two plans of the same setting differ, then both deployed models timed
interleaved call by call and each alone in blocks after a pause. ``--smoke``: ResNet-18 at 64x64.

    PYTHONPATH=src python benchmarks/plan_time.py --batch 1
    PYTHONPATH=src python benchmarks/plan_time.py --batch 32 --repeats 1
    PYTHONPATH=src python benchmarks/plan_time.py --model vit_b_16 --pattern 2:4-rows4 --compare first-share
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch

import semisparse as ss
from semisparse.cli.bench_common import srigl_like_masks
from semisparse.masking.parametrization import sparse_weights
from semisparse.models import create_model
from semisparse.runtime import deployed_layers
from semisparse.runtime.cpu import build, planner
from semisparse.runtime.timing import blocked_medians, interleaved_medians

#: The two planner settings each ``--compare`` times: (the planner before, the default now).
COMPARE = {"prune": ({"prune": None}, {"prune": 1.25}),
           "first-share": ({"first_share": 1.0}, {"first_share": 1 / 3})}


def deploy_with(model, x, setting: dict):
    """``ss.deploy`` with the planner's keyword ``setting``; returns the model and the planning seconds."""
    real = build.plan_layers
    build.plan_layers = functools.partial(planner.plan_layers, **setting)
    try:
        t = time.perf_counter()
        dep = ss.deploy(model, example_input=x)
        return dep, time.perf_counter() - t
    finally:
        build.plan_layers = real


def choices(dep, keys: list[str]) -> dict[str, str]:
    """Each masked weight's form: its kernel setting, "dense", or "torch" (kept dense as torch's own module)."""
    got = {m.key: (m.path if m.mode == "condensed" else "dense") for _, m in deployed_layers(dep)}
    return {k: got.get(k, "torch") for k in keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--pattern", default="fan-in", choices=("fan-in", "2:4-rows4"))
    p.add_argument("--compare", default="prune", choices=tuple(COMPARE))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="plans per setting, alternating which goes first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    name, size = ("resnet18", 64) if args.smoke else (args.model, 224)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = create_model(name).eval()
    if args.pattern == "fan-in":
        ss.sparsify(model, None, masks=srigl_like_masks(model, 0.9, 0.1))
    else:
        ss.sparsify(model, "2:4", shared_rows=4)
    old, new = COMPARE[args.compare]
    label = {0: f"{old}", 1: f"{new}"}
    x = torch.randn(args.batch, 3, size, size)
    keys = [sw.key for sw in sparse_weights(model)]
    print(f"{name} {args.batch}x3x{size}x{size}, {args.pattern}, {args.threads} threads, load {os.getloadavg()}",
          flush=True)
    runs: list[dict] = []
    deployed = {}
    for r in range(args.repeats):
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            dep, secs = deploy_with(model, x, (old, new)[which])
            ch = choices(dep, keys)
            n = sum(v not in ("dense", "torch") for v in ch.values())
            runs.append({"setting": label[which], "plan_s": round(secs, 1), "condensed": n, "layers": len(ch),
                         "choices": ch})
            deployed[which] = dep
            print(f"{label[which]}: planned in {secs:.1f} s, {n}/{len(ch)} condensed, load {os.getloadavg()[0]:.2f}",
                  flush=True)
    a, b = runs[-2]["choices"], runs[-1]["choices"]
    differ = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    print(f"last two plans differ on {len(differ)} layers: {differ}")
    for which in (0, 1):  # planning twice with the same planner: how much of the plan changes
        same = [r["choices"] for r in runs if r["setting"] == label[which]]
        for a, b in zip(same, same[1:]):
            sides = sum((a[k] in ("dense", "torch")) != (b[k] in ("dense", "torch")) for k in a)
            print(f"{label[which]}: two plans differ on {sum(a[k] != b[k] for k in a)} of {len(a)} layers, "
                  f"{sides} of them dense in one and condensed in the other")
    with torch.no_grad():
        fns = [functools.partial(deployed[0], x), functools.partial(deployed[1], x)]
        reps = 6 if args.batch > 8 else 30
        inter = interleaved_medians(fns, reps, warmup=2, budget_s=1e9)
        alone = blocked_medians(fns, 2 * reps, rounds=4 if args.batch > 8 else 8, warmup=2, settle_s=0.5)
    out = {"interleaved_ms": [round(t * 1e3, 2) for t in inter], "alone_ms": [round(t * 1e3, 2) for t in alone]}
    print(f"deployed ms, {label[0]} vs {label[1]}: interleaved {out['interleaved_ms']}, alone {out['alone_ms']}; "
          f"load {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "pattern": args.pattern, "compare": args.compare, "batch": args.batch,
                       "runs": runs, **out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
