"""Timers for the planner and the benchmarks: CUDA events around graph replays, medians.

A timer is ``timer(fn, what) -> seconds``: ``fn`` runs the thing once, ``what`` is a tuple naming it
(``("layer", key, form)`` or ``("model", variant)``) so that a test can inject a fake timer that answers
from a table instead of a clock.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .graph import CudaGraphs


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
            run = CudaGraphs().capture(body, ())[0] if self.graphed else body
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
