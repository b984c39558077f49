"""Cost of dynamic sparse training on CPU: one topology update over all layers of a model, and the share of
training time the updates take at delta=100 (the DESIGN target: <= 2%; one ResNet-50 update < 1 s).

share = (update + delta * capture overhead per step) / (delta * plain sparse training step), where the
capture overhead is the extra cost of a step whose dense gradient is recorded for growth (only the steps
of an update's optimizer step record it; with no gradient accumulation that is 1 of every delta steps, so
the figure printed is an upper bound).

Usage: python benchmarks/bench_dst.py [--threads 2] [--model resnet50] [--batch 16] [--res 224] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

import semisparse as ss


def _median_time(fn, reps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def bench(args: argparse.Namespace, method: str) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    factory = {"srigl": ss.SRigL, "rigl": ss.RigL}[method]
    sched = factory(model, opt, sparsity=args.sparsity, delta=args.delta, t_end=10**9)
    # Fake dense gradients of the right shapes: the update's cost does not depend on their values.
    grads = {lay.key: torch.randn_like(lay.original) for lay in sched.layers}

    sched._dense_grads.update(grads)  # the update reads them and leaves them as they are

    def one_update():
        sched.update(0.3)

    one_update()  # warm-up
    update_s, update_all = _median_time(one_update, args.reps)
    sched._dense_grads.clear()
    ss.check(model)

    flat = [lay.original.detach() for lay in sched.layers]
    pass_s, _ = _median_time(lambda: [w.abs() for w in flat], args.reps)  # one memory pass, for scale
    if args.no_train:
        return {"method": method, "model": args.model, "layers": len(sched.layers), "update_s": update_s,
                "update_runs_s": update_all, "abs_pass_s": pass_s}
    x = torch.randn(args.batch, 3, args.res, args.res)
    y = torch.randint(0, 1000, (args.batch,))

    def train_step(capture: bool):
        sched._accumulate = capture
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched._dense_grads.clear()

    train_step(False)
    step_s, _ = _median_time(lambda: train_step(False), args.reps)
    capture_s, _ = _median_time(lambda: train_step(True), args.reps)
    overhead = max(0.0, capture_s - step_s)
    share = (update_s + overhead) / (args.delta * step_s)
    return {
        "method": method, "model": args.model, "layers": len(sched.layers), "sparsity": args.sparsity,
        "update_s": update_s, "update_runs_s": update_all, "step_s": step_s, "capture_step_s": capture_s,
        "share_at_delta": share, "abs_pass_s": pass_s, "delta": args.delta, "batch": args.batch, "res": args.res,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--methods", nargs="+", default=["srigl", "rigl"])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--delta", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-train", action="store_true", help="time the update only")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"fp32, {args.model} batch {args.batch} at {args.res}x{args.res}, median of {args.reps}")
    print(f"{'method':<8}{'layers':>7}{'update s':>10}{'step s':>9}{'capture step s':>16}"
          f"{'share @delta=' + str(args.delta):>20}")
    results = []
    for method in args.methods:
        r = bench(args, method)
        results.append(r)
        if args.no_train:
            print(f"{method:<8}{r['layers']:>7}{r['update_s']:>10.3f}  (one abs pass over the weights: "
                  f"{r['abs_pass_s']:.4f} s)")
            continue
        print(f"{method:<8}{r['layers']:>7}{r['update_s']:>10.3f}{r['step_s']:>9.3f}{r['capture_step_s']:>16.3f}"
              f"{r['share_at_delta']:>19.2%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
