"""Timing, the one module both planners, ``semisparse bench`` and the demo time with.

CPU: medians of calls taken in turn (:func:`interleaved_medians`: a machine whose speed drifts hits every
candidate alike) or in blocks (:func:`blocked_medians`: warm caches, as ``timeit`` does). GPU: a timer is
``timer(fn, what) -> seconds``: ``fn`` runs the thing once, ``what`` is a tuple naming it (``("layer", key,
form)`` or ``("model", variant)``) so that a test can inject a fake timer that answers from a table instead of
a clock; :class:`GraphTimer` times CUDA-graph replays with CUDA events, :class:`WallTimer` eager calls.
:func:`capture_inputs` gives the input each layer sees in one forward, the input every layer is timed on.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

#: ``timer(fn, what) -> seconds`` (see the module docstring).
Timer = Callable[[Callable[[], object], tuple], float]


def run(model: nn.Module, example_input):
    """``model`` called on ``example_input``: a tuple or list as positional arguments, a dict as keywords."""
    if isinstance(example_input, (list, tuple)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def capture_inputs(model: nn.Module, example_input, modules: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """The input each of ``modules`` sees in one forward of ``example_input`` (hooks, removed after)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in modules:
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


def interleaved_medians(fns: list[Callable[[], object]], reps: int = 20, warmup: int = 2,
                        budget_s: float = 1.0, shuffle: bool = True, min_reps: int = 5) -> list[float]:
    """Median seconds of each of ``fns``, timed in turn within every repetition: ``reps`` repetitions, or fewer
    (not under ``min_reps``) once they took more than ``budget_s`` per fn.

    Interleaving makes the comparison fair on a machine whose speed drifts (shared cores, turbo, other
    tenants): a slow spell hits every candidate alike instead of whichever ran then. ``shuffle``: each
    repetition takes the candidates in a new (seeded) random order, so none always runs right after the
    same other one; the call after a large dense layer pays for the caches it flushed (5-15% measured on a
    batch-1 Linear when two builds swapped places).
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    rng = random.Random(0)
    start = time.perf_counter()
    for _ in range(reps):
        if shuffle:
            rng.shuffle(order)
        for i in order:
            t = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t)
        if len(times[0]) >= min_reps and time.perf_counter() - start > budget_s * len(fns):
            break
    return [statistics.median(t) for t in times]


def blocked_medians(fns: list[Callable[[], object]], reps: int = 200, rounds: int = 10,
                    warmup: int = 5, settle_s: float = 0.0) -> list[float]:
    """Median seconds per call of each of ``fns``, called back to back in blocks (warm caches).

    Each of ``rounds`` rounds runs every fn ``reps // rounds`` times in a row (the way ``timeit`` and
    ``torch.utils.benchmark`` time a statement: its data stays in cache between calls); the blocks of the
    candidates alternate, so drift of the machine hits all of them alike. ``settle_s``: a pause before each
    block, so that thread pools of the fn before (OpenMP, onnxruntime) stop spinning and do not take the
    CPUs from this one, as they would not in a process running one runtime.
    """
    per = max(1, reps // rounds)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            if settle_s > 0:
                time.sleep(settle_s)
            for _ in range(warmup):
                fn()
            for _ in range(per):
                t = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def capture_graph(fn: Callable[..., object], static_inputs: tuple = (), warmup: int = 3,
                  pool=None) -> tuple[Callable[[], None], object]:
    """``fn(*static_inputs)`` captured in a ``torch.cuda.CUDAGraph`` (warm-up on a side stream, then capture,
    into ``pool`` when given); returns the graph's replay and its static output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(*static_inputs)
    return graph.replay, out


class GraphTimer:
    """Capture ``fn`` in a CUDA graph (``inner`` calls back to back), replay it, and take the median of
    ``reps`` CUDA-event intervals divided by ``inner``: no host overhead, the conditions of a deployed model.
    ``graphed=False`` times eager calls the same way (the plain eager baseline)."""

    def __init__(self, reps: int = 20, warmup: int = 5, inner: int = 1, graphed: bool = True) -> None:
        self.reps, self.warmup, self.inner, self.graphed = reps, warmup, inner, graphed

    def __call__(self, fn: Callable[[], object], what: tuple = ()) -> float:
        inner = self.inner

        def body():
            for _ in range(inner):
                fn()

        with torch.no_grad():
            run = capture_graph(body)[0] if self.graphed else body
            for _ in range(self.warmup):
                run()
            torch.cuda.synchronize()
            times = []
            for _ in range(self.reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / inner)
        return statistics.median(times)


class WallTimer:
    """Median wall-clock seconds of eager calls (CPU runs: ``--smoke``, tests that need a real clock)."""

    def __init__(self, reps: int = 5, warmup: int = 1) -> None:
        self.reps, self.warmup = reps, warmup

    def __call__(self, fn: Callable[[], object], what: tuple = ()) -> float:
        with torch.no_grad():
            for _ in range(self.warmup):
                fn()
            times = []
            for _ in range(self.reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)
