"""Calibrated one-shot masks: SparseGPT-style reconstruction and Wanda, layer by layer in forward order.

Every eligible layer's input statistics ``H = sum x x^T`` (``(K, K)`` over the columns of its ``(rows, K)``
view, fp32 running mean) are gathered by a forward pre-hook while the model runs on the calibration set;
the layer is then pruned (:func:`~semisparse.masking.obs.column_sweep` for ``"sparsegpt"``, the score
``|W_ij| * ||x_j||`` for ``"wanda"``) before the layers after it see its outputs, so each layer is
calibrated on the outputs of the already-pruned layers before it. One Hessian is held at a time.

What forms a layer's columns: a Linear's input features; a conv's unfolded input (im2col) per group,
ordered as the layout's view (input channels innermost at each kernel tap, so N:M groups are pruned
jointly); for a padded kernel-tap layout, each input channel's taps padded to a multiple of M (an output
row's groups of M run along the taps of one channel, the padding never kept before a real weight);
``nn.MultiheadAttention``'s query / key / value for the packed QKV rows, and the attention output
(recomputed with an identity projection) for ``out_proj``, which the module uses without calling it.

With one calibration call (tensor batches are concatenated) the whole sweep is one forward pass: each hook
prunes its layer before the layer runs. With several calls, or a ``forward_loop``, each layer takes a pass.
The work happens on a copy of the model: the caller's model only changes once every layer succeeded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SemisparseError
from ..layout import Candidate, Layout
from ..patterns import NM, FanIn, fanin_mask, nm_mask, shared_row_scores
from .calibration import Calibration
from .obs import NotFactorable, column_sweep, output_error
from .parametrization import Target, detach, sparse_weights, structured_mask

CALIBRATED = ("sparsegpt", "wanda")
_UNFOLD_BYTES = 1 << 27  # im2col chunk bound while accumulating a conv's Hessian


@dataclass
class LayerResult:
    """One layer's calibrated mask and weights (weight-shaped), and its relative output error."""

    mask: torch.Tensor
    weight: torch.Tensor
    target: Target
    rel_error: float


class _Stop(Exception):
    """Ends a forward pass once the layer being calibrated has seen its input."""


class _Hessian:
    """Running mean of ``x x^T`` over rows of ``x`` ``(n, K)``, fp32; ``stack`` independent ones at once."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """``x``: ``(..., n, K)``; leading dims are independent Hessians (groups, channels)."""
        x = x.float()
        n = x.shape[-2]
        if n == 0:
            return
        xtx = x.transpose(-1, -2) @ x
        if self.h is None:
            self.h = xtx / n
        else:
            self.h.mul_(self.n / (self.n + n)).add_(xtx, alpha=1.0 / (self.n + n))
        self.n += n


def _check_finite(x: torch.Tensor, key: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise SemisparseError(
            f"{key}: its calibration inputs contain NaN or Inf (check the calibration data and the layers before it)"
        )


class _Probe:
    """Gathers one layer's Hessians and turns them into ``(rows, H)`` blocks of its view."""

    def __init__(self, c: Candidate, module: nn.Module, pattern: NM | FanIn) -> None:
        self.c, self.module, self.pattern = c, module, pattern
        self.hessians: dict[str, _Hessian] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        self.hessians.setdefault(name, _Hessian()).add(x)

    @property
    def seen(self) -> bool:
        return bool(self.hessians) and all(h.n for h in self.hessians.values())

    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.c.param).detach()

    def set_weight(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            getattr(self.module, self.c.param).copy_(w)

    # -- inputs ------------------------------------------------------------------------------------------
    def _check_width(self, got: int, want: int) -> None:
        if got != want:
            raise SemisparseError(
                f"the model rejected the calibration inputs ({self.c.key} takes {want} input features, got {got})"
            )

    def add_linear(self, x: torch.Tensor) -> None:
        self._check_width(x.shape[-1] if x.dim() else 0, self.weight().shape[1])
        _check_finite(x, self.c.key)
        self.add("x", x.reshape(-1, x.shape[-1]))

    def add_conv(self, x: torch.Tensor) -> None:
        m = self.module
        self._check_width(x.shape[-(m.weight.dim() - 1)] if x.dim() >= m.weight.dim() - 1 else 0, m.in_channels)
        _check_finite(x, self.c.key)
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        if isinstance(m, nn.Conv1d):
            x = x.unsqueeze(2)
            kernel, stride, dilation = (1, *m.kernel_size), (1, *m.stride), (1, *m.dilation)
        else:
            kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
        groups, cpg, taps = m.groups, m.in_channels // m.groups, math.prod(m.kernel_size)
        positions = max(1, math.prod(
            (x.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)
        ))
        per_sample = m.in_channels * taps * positions * 4
        step = max(1, _UNFOLD_BYTES // max(1, per_sample))
        for i in range(0, x.shape[0], step):
            cols = F.unfold(x[i:i + step].float(), kernel, dilation=dilation, stride=stride)  # (n, C*taps, L)
            n, _, length = cols.shape
            if self.c.layout.mode == "taps":  # one per group, natural order (taps innermost; padded later)
                per = cols.reshape(n, groups, cpg * taps, length).permute(1, 0, 3, 2).reshape(groups, -1, cpg * taps)
            else:  # one per group, columns in the view's order (channels innermost at each tap)
                per = cols.reshape(n, groups, cpg, taps, length).permute(1, 0, 4, 3, 2).reshape(groups, -1, taps * cpg)
            self.add("x", per)

    # -- blocks of the view --------------------------------------------------------------------------------
    def blocks(self) -> list[tuple[torch.Tensor | slice, torch.Tensor]]:
        """``(rows of the view, H over its columns)`` pairs covering every row of the layer's view."""
        c, m = self.c, self.module
        if isinstance(m, nn.MultiheadAttention) and c.param == "in_proj_weight":
            e = m.embed_dim
            hs = self.hessians
            if set(hs) == {"x"}:
                return [(slice(None), hs["x"].h)]
            return [(slice(0, e), hs["q"].h), (slice(e, 2 * e), hs["k"].h), (slice(2 * e, 3 * e), hs["v"].h)]
        h = self.hessians["x"].h
        if c.layout.mode == "rows":
            return [(slice(None), h)]
        out, cpg = m.out_channels, m.in_channels // m.groups
        opg = out // m.groups
        if c.layout.mode == "taps":  # the wide view's columns: channel c, tap t at c * width + t (padded)
            taps = c.layout.taps
            width = self.pattern.m * math.ceil(taps / self.pattern.m)
            tap = torch.arange(taps, device=h.device)
            idx = (torch.arange(cpg, device=h.device)[:, None] * width + tap).reshape(-1)
            padded = torch.zeros(m.groups, cpg * width, cpg * width, dtype=h.dtype, device=h.device)
            padded[:, idx[:, None], idx[None, :]] = h
            h = padded
        return [(slice(g * opg, (g + 1) * opg), h[g]) for g in range(m.groups)]


def _prune(probe: _Probe, method: str, pattern: NM | FanIn, dampening: float, blocksize: int,
           shared_rows: int = 1) -> LayerResult:
    """One layer's mask and weights. ``shared_rows`` blocks are counted within each Hessian block (a conv group,
    one of q / k / v): rows of different blocks read different inputs, so sharing across them buys nothing."""
    c = probe.c
    layout: Layout = c.layout
    w = probe.weight()
    m_ = pattern.m if isinstance(pattern, NM) else None
    view = layout.to_view(w.float(), m_, fill=0)
    target: Target = pattern if isinstance(pattern, NM) else pattern.k(view.shape[1])
    pad_cols = None
    narrow = view.shape
    if layout.mode == "taps":  # each output row's (channel, padded taps) as one row: channels interact
        view = view.reshape(w.shape[0], -1)
        pad_cols = torch.arange(view.shape[1], device=w.device) % narrow[1] >= layout.taps
    new = view.to(torch.float64).clone()
    keep = torch.ones(view.shape, dtype=torch.bool, device=w.device)
    num = den = 0.0
    blocks = probe.blocks()
    if method == "wanda":
        score = torch.empty_like(view)
        for rows, h in blocks:
            own = view[rows].abs() * torch.diagonal(h).clamp_min(0).sqrt()[None, :]
            score[rows] = shared_row_scores(own, shared_rows)
        if pad_cols is not None:
            score[:, pad_cols] = float("-inf")
        keep = nm_mask(score, pattern.n, pattern.m) if isinstance(pattern, NM) else fanin_mask(score, target)
        new = view.to(torch.float64) * keep
    for rows, h in blocks:
        if method == "sparsegpt":
            try:
                wb, kb = column_sweep(
                    view[rows], h, target, dampening=dampening, blocksize=blocksize, pad_cols=pad_cols,
                    shared_rows=shared_rows,
                )
            except NotFactorable:
                raise SemisparseError(
                    f"{c.key}: its input Hessian cannot be factored even after dampening {dampening:g} of its mean "
                    "diagonal; pass a larger dampening= or more varied calibration data"
                ) from None
            new[rows], keep[rows] = wb, kb
        a, b = output_error(view[rows], new[rows], h)
        num, den = num + a, den + b
    weight = layout.from_view(new.reshape(narrow).to(w.dtype))
    mask = layout.from_view(keep.reshape(narrow))
    return LayerResult(mask, weight, target, math.sqrt(num / den) if den > 0 else 0.0)


def _mha_call(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict:
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    bound = dict(zip(names, args)) | kwargs
    bound.setdefault("key", bound["query"])
    bound.setdefault("value", bound["key"])
    return bound


def _attention_output(module: nn.MultiheadAttention, call: dict) -> torch.Tensor:
    """The input of ``module.out_proj``: the attention output before the output projection."""
    q, k, v = call["query"], call["key"], call["value"]
    if module.batch_first and q.dim() == 3:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    e = module.embed_dim
    eye = torch.eye(e, dtype=q.dtype, device=q.device)
    out, _ = F.multi_head_attention_forward(
        q, k, v, e, module.num_heads, module.in_proj_weight, module.in_proj_bias, module.bias_k, module.bias_v,
        module.add_zero_attn, 0.0, eye, None, training=False, key_padding_mask=call.get("key_padding_mask"),
        need_weights=False, attn_mask=call.get("attn_mask"),
        use_separate_proj_weight=not module._qkv_same_embed_dim,
        q_proj_weight=module.q_proj_weight, k_proj_weight=module.k_proj_weight, v_proj_weight=module.v_proj_weight,
        is_causal=bool(call.get("is_causal", False)),
    )
    return out


def calibrated_masks(
    model: nn.Module,
    candidates: Sequence[Candidate],
    pattern: NM | FanIn,
    method: str,
    calibration: Calibration,
    *,
    dampening: float = 0.01,
    blocksize: int = 128,
    progress: Callable[[str, int, int], None] | None = None,
    shared_rows: int = 1,
) -> tuple[dict[str, LayerResult], list[str]]:
    """``{weight key: LayerResult}`` for every candidate that ran, and report notes; the model is not touched.

    Layers the model never calls on the calibration inputs get magnitude masks (named in the notes).
    ``shared_rows``: each block of that many consecutive output rows (within a conv group or one of the packed
    q / k / v) keeps the same positions.
    ``progress(key, done, total)`` is called after each layer.
    """
    try:
        work = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - any copy failure is reported in one line
        raise SemisparseError(f"cannot copy the model for calibration ({type(e).__name__}: {_first_line(e)})") from None
    for sw in list(sparse_weights(work)):
        detach(sw.module, sw.param)  # calibrate from the dense weights kept underneath
    work.eval()
    probes: dict[str, _Probe] = {}
    for c in candidates:
        mod = work.get_submodule(c.name)
        if isinstance(mod, nn.Conv3d):
            raise SemisparseError(
                f"{c.key}: method={method!r} calibrates Linear, Conv1d/Conv2d and MultiheadAttention layers, not "
                "Conv3d; exclude it (exclude=...) or use method='magnitude'"
            )
        probes[c.key] = _Probe(c, mod, pattern)
    out_proj_of = {}  # out_proj Linear key -> its MultiheadAttention's module name
    for name, mod in work.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            key = f"{name}.out_proj.weight" if name else "out_proj.weight"
            if key in probes:
                out_proj_of[key] = name

    order: list[str] = []
    active: set[str] = set()
    state = {"prune_now": False, "stop_after": None}
    results: dict[str, LayerResult] = {}

    def finish(key: str) -> None:
        probe = probes[key]
        active.discard(key)
        if not probe.seen:  # not reached in its pass: a magnitude mask below, named in the notes
            return
        results[key] = _prune(probe, method, pattern, dampening, blocksize, shared_rows)
        probe.set_weight(results[key].weight)
        probe.hessians.clear()
        active.discard(key)
        if progress is not None:
            progress(key, len(results), len(probes))

    def visit(key: str, feed: Callable[[], None]) -> None:
        if key not in order:
            order.append(key)
        if key in active:
            feed()
            if state["prune_now"]:
                finish(key)
            elif state["stop_after"] == key:
                raise _Stop

    handles = []

    def linear_hook(mod, args, key):
        visit(key, lambda: probes[key].add_linear(args[0]))

    def conv_hook(mod, args, key):
        visit(key, lambda: probes[key].add_conv(args[0]))

    def mha_hook(mod, args, kwargs, name):
        call = _mha_call(mod, args, kwargs)
        prefix = f"{name}." if name else ""
        qkv = [k for k in (prefix + "in_proj_weight", prefix + "q_proj_weight", prefix + "k_proj_weight",
                           prefix + "v_proj_weight") if k in probes]
        for key in qkv:
            p = probes[key]

            def feed(p=p, key=key):
                q, k, v = call["query"], call["key"], call["value"]
                for t in (q, k, v):
                    _check_finite(t, key)
                if key.endswith("in_proj_weight"):
                    if q is k and k is v:
                        p.add("x", q.reshape(-1, q.shape[-1]))
                    else:
                        for n, t in (("q", q), ("k", k), ("v", v)):
                            p.add(n, t.reshape(-1, t.shape[-1]))
                else:
                    t = {"q": q, "k": k, "v": v}[key[-len("q_proj_weight"):][0]]
                    p.add("x", t.reshape(-1, t.shape[-1]))

            visit(key, feed)
        key = prefix + "out_proj.weight"
        if key in out_proj_of:
            visit(key, lambda: probes[key].add_linear(_attention_output(mod, call)))

    for key, p in probes.items():
        mod = p.module
        if key in out_proj_of:
            continue
        if isinstance(mod, nn.MultiheadAttention):
            continue
        fn = conv_hook if isinstance(mod, nn.modules.conv._ConvNd) else linear_hook
        handles.append(mod.register_forward_pre_hook(lambda m, a, key=key, fn=fn: fn(m, a, key)))
    for name, mod in work.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.MultiheadAttention) and any(
            k in probes for k in (prefix + p for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                                      "v_proj_weight", "out_proj.weight"))
        ):
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, kw, name=name: mha_hook(m, a, kw, name), with_kwargs=True))

    def run(what: str) -> None:
        try:
            calibration.run(work, None)
        except (_Stop, SemisparseError):
            raise
        except Exception as e:  # noqa: BLE001 - the model's own error, reported in one line
            raise SemisparseError(
                f"the model rejected the calibration inputs{what} ({type(e).__name__}: {_first_line(e)})"
            ) from None

    try:
        one_pass = not calibration.streamed and len(calibration.calls) == 1
        if one_pass:
            active.update(probes)
            state["prune_now"] = True
            run("")
        else:
            run("")  # a dense pass: the layers' forward order
            for key in list(order):
                active.add(key)
                if calibration.streamed:
                    run(f" (pass for {key})")
                else:
                    state["stop_after"] = key
                    for args, kwargs in calibration.calls:
                        try:
                            with torch.no_grad():
                                work(*args, **kwargs)
                        except _Stop:
                            pass
                        except SemisparseError:
                            raise
                        except Exception as e:  # noqa: BLE001
                            raise SemisparseError(
                                f"the model rejected the calibration inputs ({type(e).__name__}: {_first_line(e)})"
                            ) from None
                    state["stop_after"] = None
                finish(key)
    finally:
        for h in handles:
            h.remove()
    notes = []
    unseen = [k for k in probes if k not in results]
    for key in unseen:
        p = probes[key]
        w = p.weight()
        mask, target = structured_mask(w.abs(), p.c.layout, pattern, shared_rows)
        results[key] = LayerResult(mask, w * mask, target, float("nan"))
    if unseen:
        notes.append(f"not called on the calibration inputs, magnitude masks instead: {', '.join(unseen)}")
    return results, notes


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
