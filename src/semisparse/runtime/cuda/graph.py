"""CUDA graphs around a deployed model: one capture per input shape, replayed with static buffers.

cuSPARSELt's eager calls cost ~0.45 ms of host work each (H200); a captured graph replays the whole forward
with none. :class:`GraphedModule` keeps a graph per input shape: the planned shape is captured at deploy
time, a new shape is captured on its first call, up to ``max_shapes`` (default 8) graphs; beyond that a
new shape runs eagerly (same results, host overhead back) and a warning says so once. Inputs are copied
into the graph's static buffers (cast to the model's dtype and device, in its memory format), and outputs
are cloned out of the graph's static outputs, so a later call never overwrites what an earlier one returned.

The capture mechanism is injected (:class:`CudaGraphs` on a GPU, :class:`EmulatedGraphs` elsewhere), so
the shape handling is tested on CPU.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from ..timing import capture_graph

#: How many input shapes get their own graph before new shapes run eagerly.
MAX_SHAPES = 8


class CudaGraphs:
    """Capture with ``torch.cuda.CUDAGraph``: warm-up on a side stream, then capture into one shared pool."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.pool = None

    def capture(self, fn: Callable[..., object], static_inputs: tuple) -> tuple[Callable[[], None], object]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return capture_graph(fn, static_inputs, self.warmup, self.pool)


class EmulatedGraphs:
    """A stand-in with a graph's semantics and no CUDA: replay reruns ``fn`` on the static inputs and writes
    the result into the static outputs captured first (so aliasing behaves as with a real graph)."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, fn: Callable[..., object], static_inputs: tuple) -> tuple[Callable[[], None], object]:
        self.captures += 1
        out = fn(*static_inputs)

        def replay() -> None:
            self.replays += 1
            _copy_tree(out, fn(*static_inputs))

        return replay, out


def _copy_tree(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            _copy_tree(d, s)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_tree(dst[k], src[k])


def _clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone_tree(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    return x


class GraphedModule(nn.Module):
    """Runs ``module`` through captured graphs, one per input shape (see the module docstring).

    ``dtype``/``device``/``memory_format``: what floating inputs are cast to in the static buffers (the
    deployed model's own). ``graphs=None`` runs eagerly (``deploy(..., graph=False)``). Only tensor
    positional arguments are graphed; anything else runs eagerly.
    """

    def __init__(self, module: nn.Module, graphs, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, memory_format: torch.memory_format | None = None,
                 max_shapes: int = MAX_SHAPES, clone_outputs: bool = True) -> None:
        super().__init__()
        self.module = module
        self.graphs = graphs
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.memory_format = memory_format
        self.max_shapes = max_shapes
        self.clone_outputs = clone_outputs
        self._cache: OrderedDict = OrderedDict()
        self.eager_calls = 0
        self._warned = False

    @property
    def shapes(self) -> list[tuple]:
        """The input shapes that have a captured graph, in capture order."""
        return list(self._cache)

    def _key(self, args: tuple) -> tuple | None:
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        return tuple((tuple(a.shape), a.dtype.is_floating_point) for a in args)

    def _static(self, a: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if (self.dtype is not None and a.dtype.is_floating_point) else a.dtype
        device = self.device if self.device is not None else a.device
        fmt = self.memory_format if (self.memory_format is not None and a.dim() == 4) else torch.contiguous_format
        return torch.empty(a.shape, dtype=dtype, device=device).contiguous(memory_format=fmt)

    def capture(self, *args: torch.Tensor) -> None:
        """Capture the graph for these inputs' shapes now (deploy does it for the planned shape)."""
        key = self._key(args)
        if key is None or key in self._cache:
            return
        static = tuple(self._static(a) for a in args)
        for s, a in zip(static, args):
            s.copy_(a)
        with torch.no_grad():
            replay, out = self.graphs.capture(self.module, static)
        self._cache[key] = (static, replay, out)

    @torch.no_grad()
    def forward(self, *args: torch.Tensor):
        if self.graphs is None:  # graph=False: eager, inputs still cast to the model's dtype and device
            with torch.no_grad():
                return self.module(*(self._cast(a) for a in args))
        key = self._key(args)
        if key is not None and key not in self._cache and len(self._cache) < self.max_shapes:
            self.capture(*args)
        entry = self._cache.get(key) if key is not None else None
        if entry is None:
            self.eager_calls += 1
            if key is not None and not self._warned:
                self._warned = True
                warnings.warn(f"semisparse: {len(self._cache)} input shapes already have CUDA graphs "
                              f"(max_shapes={self.max_shapes}); shape {key[0][0]} runs eagerly", RuntimeWarning,
                              stacklevel=2)
            with torch.no_grad():
                return self.module(*(self._cast(a) for a in args))
        static, replay, out = entry
        for s, a in zip(static, args):
            s.copy_(a)
        replay()
        return _clone_tree(out) if self.clone_outputs else out

    def semisparse_unwrap(self) -> tuple[nn.Module, Callable]:
        """What ``ss.report`` describes (the model inside, named as the user's model) and how to run it
        eagerly on the caller's inputs (a replayed graph runs no forward hooks, so MACs need an eager call)."""
        return self.module, lambda *args: self.module(*(self._cast(a) for a in args))

    def _cast(self, a):
        if not isinstance(a, torch.Tensor):
            return a
        s = self._static(a)
        s.copy_(a)
        return s
