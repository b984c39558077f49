"""Channel permutation for N:M (Pool & Yu 2021, NVIDIA ASP's ``--apex-permutation``).

Reordering the input channels of a layer changes which weights share a group of M, and so how much
magnitude an N:M mask can keep. The network computes the same function if the tensor that feeds the
layer has its channels reordered the same way: the producing layers' output rows (conv/linear weight rows
and biases), every channel-wise layer on the way (BatchNorm, LayerNorm over channels, depthwise convs,
layer-scale parameters, residual additions) and every other consumer of that tensor are permuted together.

The model is traced with ``torch.fx``; each tensor's channel axis is followed through the graph and
tensors whose channels must move together (e.g. all the blocks of a ResNet stage, tied by residual
additions) form one *channel space*. A space whose channels reach anything not understood (the model's
input or output, concatenation, reshapes, unknown functions, modules called twice) is left alone.

Search (per space): start from the identity and repeatedly pair up groups of M columns at random, try
every way to split the 2M columns of a pair between the two groups (35 splits for M=4; single swaps for
larger M), and keep the best split of every pair. The objective is the |w| an N:M magnitude mask keeps,
summed over every eligible consumer, on a ``(rows * taps, channels)`` stack of their weights.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import SemisparseError
from ..layout import Candidate
from ..patterns import NM

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Identity,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish,
    F.dropout, torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.dropout2d,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "half", "to"}
_BINARY = {operator.add, operator.mul, operator.sub, operator.iadd, operator.imul, torch.add, torch.mul}
_ADAPTIVE = {F.adaptive_avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_max_pool2d}


@dataclass
class _Space:
    """Tensors whose channel axis must be permuted together, and what that touches."""

    size: int | None = None
    blocked: str = ""
    members: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (tensor, axis) to reorder
    consumers: list[tuple[str, nn.Module]] = field(default_factory=list)  # layers reading these channels
    parent: _Space | None = None

    def root(self) -> _Space:
        s = self
        while s.parent is not None:
            s = s.parent
        return s


def _union(a: _Space, b: _Space) -> _Space:
    a, b = a.root(), b.root()
    if a is b:
        return a
    b.parent = a
    a.members += b.members
    a.consumers += b.consumers
    if a.size is None:
        a.size = b.size
    elif b.size is not None and b.size != a.size:
        a.blocked = a.blocked or f"channel counts {a.size} and {b.size} meet"
    a.blocked = a.blocked or b.blocked
    return a


@dataclass(frozen=True)
class _Chan:
    """A traced tensor's channel axis: its space, axis counted from the end, rank, other dims all 1."""

    space: _Space
    axis: int  # negative
    ndim: int
    ones: bool = False


def _block(x: object, why: str) -> None:
    if isinstance(x, _Chan):
        r = x.space.root()
        r.blocked = r.blocked or why


def channel_spaces(model: nn.Module) -> list[_Space]:
    """Trace ``model`` and return its channel spaces (roots), blocked ones included with the reason."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "cannot permute"
        raise SemisparseError(
            f"permute=True needs a model torch.fx can trace; tracing failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    env: dict[torch.fx.Node, object] = {}
    spaces: list[_Space] = []

    def new_space(size: int | None, why: str = "") -> _Space:
        s = _Space(size=size, blocked=why)
        spaces.append(s)
        return s

    def attr(target: str) -> torch.Tensor:
        obj = gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    for node in gm.graph.nodes:
        args = [env.get(a) if isinstance(a, torch.fx.Node) else a for a in node.args]
        kwargs = {k: env.get(v) if isinstance(v, torch.fx.Node) else v for k, v in node.kwargs.items()}
        x = args[0] if args else None
        out: object = None
        if node.op == "placeholder":
            out = None  # the model's input: its channels are fixed
        elif node.op == "get_attr":
            out = ("attr", attr(node.target))
        elif node.op == "output":
            for a in node.all_input_nodes:
                _block(env.get(a), "reaches the model's output")
            continue
        elif node.op == "call_module":
            mod = modules[node.target]
            has_state = next(iter(mod.parameters()), None) is not None or next(iter(mod.buffers()), None) is not None
            out = _module_rule(node.target, mod, x, calls[node.target] > 1 and has_state, new_space)
        elif node.op in ("call_function", "call_method"):
            out = _function_rule(node, args, kwargs, new_space)
        if out is None:  # not understood: whatever channels flow in must stay where they are
            for a in node.all_input_nodes:
                _block(env.get(a), f"used by {node.op} {node.target}")
        env[node] = out
    return [s for s in spaces if s.parent is None]


def _module_rule(name, mod, x, shared, new_space):
    chan = x if isinstance(x, _Chan) else None
    if shared:
        _block(chan, f"{name} is called more than once")
        return None
    if isinstance(mod, _CONVS):
        dw = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        if dw:
            if chan is None or chan.axis != -(len(mod.kernel_size) + 1):
                _block(chan, f"{name}: depthwise conv on a non-channel axis")
                return None
            r = chan.space.root()
            r.members += [(mod.weight, 0)] + ([(mod.bias, 0)] if mod.bias is not None else [])
            return _Chan(chan.space, chan.axis, chan.ndim)
        nsp = len(mod.kernel_size)
        if chan is not None:
            if mod.groups > 1 or chan.axis != -(nsp + 1):
                _block(chan, f"{name}: grouped conv or channel axis mismatch")
            else:
                r = chan.space.root()
                r.members.append((mod.weight, 1))
                r.consumers.append((name, mod))
        sp = new_space(mod.out_channels, "grouped conv output" if mod.groups > 1 else "")
        sp.members += [(mod.weight, 0)] + ([(mod.bias, 0)] if mod.bias is not None else [])
        ndim = chan.ndim if chan is not None else nsp + 2
        return _Chan(sp, -(nsp + 1), ndim)
    if isinstance(mod, nn.Linear):
        if chan is not None:
            if chan.axis != -1:
                _block(chan, f"{name}: Linear on a non-channel axis")
            else:
                r = chan.space.root()
                r.members.append((mod.weight, 1))
                r.consumers.append((name, mod))
        sp = new_space(mod.out_features)
        sp.members += [(mod.weight, 0)] + ([(mod.bias, 0)] if mod.bias is not None else [])
        return _Chan(sp, -1, chan.ndim if chan is not None else 2)
    if chan is None:
        return None
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        if chan.axis != -(chan.ndim - 1):
            _block(chan, f"{name}: BatchNorm on a non-channel axis")
            return None
        r = chan.space.root()
        for t in (mod.weight, mod.bias, mod.running_mean, mod.running_var):
            if t is not None:
                r.members.append((t, 0))
        return chan
    if isinstance(mod, nn.LayerNorm):
        if len(mod.normalized_shape) != 1 or chan.axis != -1:
            _block(chan, f"{name}: LayerNorm not over the channel axis alone")
            return None
        r = chan.space.root()
        for t in (mod.weight, mod.bias):
            if t is not None:
                r.members.append((t, 0))
        return chan
    if isinstance(mod, _ELEMENTWISE_MODULES):
        return chan
    if isinstance(mod, _POOLS):
        ones = isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d)) and all(
            s == 1 for s in (mod.output_size if isinstance(mod.output_size, tuple) else (mod.output_size,))
        )
        return _Chan(chan.space, chan.axis, chan.ndim, ones)
    if isinstance(mod, nn.Flatten):
        return _flatten(chan, mod.start_dim, mod.end_dim)
    if type(mod).__name__ == "StochasticDepth":
        return chan
    _block(chan, f"{name}: {type(mod).__name__} is not understood")
    return None


def _flatten(chan: _Chan, start: int, end: int = -1) -> _Chan | None:
    pos = chan.ndim + chan.axis
    start = start % chan.ndim
    end = end % chan.ndim
    if chan.ones and start == 1 and end == chan.ndim - 1 and pos >= 1:
        return _Chan(chan.space, -1, chan.ndim - (end - start))
    if pos < start or pos > end:
        return _Chan(chan.space, chan.axis + (end - start) if pos < start else chan.axis, chan.ndim - (end - start))
    _block(chan, "flattened with other axes")
    return None


def _function_rule(node, args, kwargs, new_space):
    target = node.target
    x = args[0] if args else None
    chan = x if isinstance(x, _Chan) else None
    if node.op == "call_method" and target in _ELEMENTWISE_METHODS:
        return chan
    if node.op == "call_function" and target in _ELEMENTWISE_FUNCTIONS:
        return chan
    if node.op == "call_function" and getattr(target, "__name__", "") == "stochastic_depth":
        return chan
    if target in _BINARY or (node.op == "call_method" and target in ("add", "mul", "add_", "mul_")):
        a, b = (args + [None, None])[:2]
        chans = [v for v in (a, b) if isinstance(v, _Chan)]
        other = b if isinstance(a, _Chan) else a
        if len(chans) == 2:
            if a.axis != b.axis:
                _block(a, "added along different axes")
                _block(b, "added along different axes")
                return None
            _union(a.space, b.space)
            return _Chan(a.space, a.axis, max(a.ndim, b.ndim), a.ones and b.ones)
        if len(chans) == 1 and isinstance(other, (int, float)):
            return chans[0]
        if len(chans) == 1 and isinstance(other, tuple) and other[0] == "attr":
            c, t = chans[0], other[1]
            if t.dim() >= -c.axis and t.shape[c.axis] == c.space.root().size:
                if all(s == 1 for i, s in enumerate(t.shape) if i != t.dim() + c.axis):
                    c.space.root().members.append((t, t.dim() + c.axis))
                    return c
            if t.numel() == 1:
                return c
        return None
    if node.op == "call_method" and target == "permute" and chan is not None:
        dims = [d for d in args[1:]] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else list(args[1])
        dims = [d % chan.ndim for d in dims]
        if len(dims) != chan.ndim:
            return None
        new_pos = dims.index(chan.ndim + chan.axis)
        return _Chan(chan.space, new_pos - chan.ndim, chan.ndim, chan.ones)
    if target is torch.permute and chan is not None:
        dims = [d % chan.ndim for d in args[1]]
        return _Chan(chan.space, dims.index(chan.ndim + chan.axis) - chan.ndim, chan.ndim, chan.ones)
    if (target is torch.flatten or (node.op == "call_method" and target == "flatten")) and chan is not None:
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return _flatten(chan, start, end)
    if target in _ADAPTIVE and chan is not None:
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        ones = all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))
        return _Chan(chan.space, chan.axis, chan.ndim, ones)
    if node.op == "call_function" and target is F.layer_norm and chan is not None:
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        w = args[2] if len(args) > 2 else kwargs.get("weight")
        b = args[3] if len(args) > 3 else kwargs.get("bias")
        if len(shape) == 1 and chan.axis == -1:
            r = chan.space.root()
            for t in (w, b):
                if isinstance(t, tuple) and t[0] == "attr":
                    r.members.append((t[1], 0))
                elif t is not None:
                    _block(chan, "layer_norm with a computed weight")
            return chan
    if node.op == "call_method" and target in ("size", "dim") or target is getattr:
        return ("sink",)
    return None


def _kept(view: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Magnitude kept by N:M along the last axis of ``|w|`` ``(..., C)`` per group: ``(..., C // M)``."""
    g = view.reshape(*view.shape[:-1], -1, m)
    return _topn_sum(g.unbind(-1), n)


def _topn_sum(xs: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """Elementwise sum of the ``n`` largest of the M same-shaped tensors ``xs``.

    An odd-even transposition sorting network of max/min: far faster than ``topk`` over a tiny axis.
    """
    xs = list(xs)
    m = len(xs)
    for r in range(m):
        for i in range(r % 2, m - 1, 2):
            hi, lo = torch.maximum(xs[i], xs[i + 1]), torch.minimum(xs[i], xs[i + 1])
            xs[i], xs[i + 1] = hi, lo
    out = xs[0]
    for t in xs[1:n]:
        out = out + t
    return out


def _splits(m: int) -> torch.Tensor:
    """Ways to divide 2M slots between two groups of M: ``(S, 2M)`` index rows, identity first."""
    if math.comb(2 * m, m) // 2 <= 128:
        rows = []
        for left in itertools.combinations(range(1, 2 * m), m - 1):
            a = (0, *left)
            b = tuple(i for i in range(2 * m) if i not in a)
            rows.append(a + b)
        return torch.tensor(rows)
    rows = [list(range(2 * m))]
    for i in range(m):
        for j in range(m, 2 * m):
            r = list(range(2 * m))
            r[i], r[j] = r[j], r[i]
            rows.append(r)
    return torch.tensor(rows)


def search_permutation(
    mats: Sequence[torch.Tensor],
    nm: NM,
    *,
    rounds: int = 12,
    patience: int = 3,
    max_rows: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """A permutation of the C columns of ``mats`` (each ``(rows_i, C)``) raising the N:M-kept ``|w|``.

    Only improving moves are taken; with more than ``max_rows`` rows the search scores a fixed random
    subset of rows (the caller checks the full objective). Returns ``perm`` ``(C,)``: new column ``j`` is
    old column ``perm[j]``.
    """
    a = torch.cat([m.detach().abs().float().cpu() for m in mats], 0)  # (R, C)
    c = a.shape[1]
    perm = torch.arange(c)
    groups = c // nm.m
    if c % nm.m or groups < 2:
        return perm
    splits = _splits(nm.m)  # (S, 2M)
    gen = torch.Generator().manual_seed(seed)
    if a.shape[0] > max_rows:
        a = a[torch.randperm(a.shape[0], generator=gen)[:max_rows]]
    cols = a.T.contiguous()  # (C, R): column-major for gathers
    budget = max(1, int(1e7 // max(1, splits.shape[0] * 2 * nm.m * a.shape[0])))  # pairs per chunk
    stale = 0
    for _ in range(rounds):
        order = torch.randperm(groups, generator=gen)
        pairs = order[: groups // 2 * 2].reshape(-1, 2)  # (Pp, 2) group ids
        slots = (pairs[:, :, None] * nm.m + torch.arange(nm.m)).reshape(-1, 2 * nm.m)  # (Pp, 2M) positions
        improved = False
        for s in range(0, len(slots), budget):
            sl = slots[s : s + budget]
            cand = perm[sl][:, splits]  # (p, S, 2M) column ids
            vals = cols[cand]  # (p, S, 2M, R)
            score = _topn_sum(vals[:, :, : nm.m].unbind(2), nm.n) + _topn_sum(vals[:, :, nm.m :].unbind(2), nm.n)
            score = score.sum(-1)  # (p, S)
            best = score.argmax(1)
            gain = score.gather(1, best[:, None])[:, 0] - score[:, 0]
            take = gain > 1e-6 * score[:, 0].clamp_min(1e-12)
            if take.any():
                improved = True
                rows = sl[take]
                perm[rows] = cand[take, best[take]]
        stale = 0 if improved else stale + 1
        if stale >= patience:
            break
    return perm


def kept_fraction(mats: Sequence[torch.Tensor], nm: NM, perm: torch.Tensor | None = None) -> float:
    """Share of ``sum |w|`` that an N:M magnitude mask keeps, columns reordered by ``perm``."""
    a = torch.cat([m.detach().abs().float() for m in mats], 0)
    if perm is not None:
        a = a[:, perm]
    return float(_kept(a, nm.n, nm.m).sum() / a.sum().clamp_min(1e-12))


def _kept_sum(mat: torch.Tensor, nm: NM, perm: torch.Tensor | None = None) -> float:
    a = mat.detach().abs().float()
    return float(_kept(a if perm is None else a[:, perm], nm.n, nm.m).sum())


def _consumer_matrix(mod: nn.Module) -> torch.Tensor:
    """Consumer weight -> ``(out * taps, in_channels)``: input channels as columns."""
    w = mod.weight.detach()
    if w.dim() == 2:
        return w
    return w.reshape(w.shape[0], w.shape[1], -1).transpose(1, 2).reshape(-1, w.shape[1])


@dataclass
class PermutationResult:
    """Per permuted space: the layers whose N:M inputs gained, with kept share before and after."""

    gains: dict[str, tuple[float, float]]  # weight key -> (kept share before, after)
    skipped: list[str]


def permute_channels(
    model: nn.Module,
    nm: NM,
    candidates: Sequence[Candidate],
    *,
    rounds: int = 12,
    max_rows: int = 512,
    seed: int = 0,
) -> PermutationResult:
    """Permute channels of ``model`` in place so N:M magnitude masks keep more; same function.

    Only spaces with at least one eligible (``candidates``) consumer are searched.
    """
    if not isinstance(nm, NM):
        raise SemisparseError(f"permute=True needs an N:M pattern, got {nm}")
    eligible = {id(c.module): c for c in candidates if c.eligible and c.layout is not None and c.layout.mode != "taps"}
    gains: dict[str, tuple[float, float]] = {}
    skipped = []
    for sp in channel_spaces(model):
        used = [(name, mod) for name, mod in sp.consumers if id(mod) in eligible]
        if not used:
            continue
        if sp.blocked:
            skipped.append(f"{', '.join(n for n, _ in used[:3])}: {sp.blocked}")
            continue
        mats = [_consumer_matrix(mod) for _, mod in used]
        perm = search_permutation(mats, nm, rounds=rounds, max_rows=max_rows, seed=seed)
        if torch.equal(perm, torch.arange(len(perm))):
            continue
        sums = [(_kept_sum(m, nm), _kept_sum(m, nm, perm), float(m.abs().sum().clamp_min(1e-12))) for m in mats]
        if sum(a for _, a, _ in sums) <= sum(b for b, _, _ in sums):
            continue  # the row sample misled the search: keep the identity
        seen = set()
        with torch.no_grad():
            for t, axis in sp.members:
                if (id(t), axis) in seen:
                    continue
                seen.add((id(t), axis))
                t.copy_(t.index_select(axis, perm.to(t.device)))
        for (_name, mod), (b, a, total) in zip(used, sums):
            gains[eligible[id(mod)].key] = (b / total, a / total)
    return PermutationResult(gains, skipped)


def annotate_report(rep, result: PermutationResult) -> None:
    """Put each permuted layer's kept magnitude share (before -> after) into the report."""
    for r in rep.layers:
        if r.name in result.gains:
            before, after = result.gains[r.name]
            r.extra["kept_before_perm"] = round(before, 4)
            r.extra["kept_after_perm"] = round(after, 4)
    if result.gains:
        rep.notes.append(
            f"channel permutation: {len(result.gains)} layers gained; mean kept |w| share "
            f"{sum(b for b, _ in result.gains.values()) / len(result.gains):.4f} -> "
            f"{sum(a for _, a in result.gains.values()) / len(result.gains):.4f}"
        )
    for s in result.skipped:
        rep.notes.append(f"channel permutation skipped for {s}")
