"""Prune and grow rules, vectorised over a whole layer (no per-neuron Python loop).

Every rule works on the ``(rows, K)`` view of :mod:`semisparse.layout` (one row per output neuron) and
takes the current bool ``mask``, the weight ``w`` and the dense gradient ``g`` (the gradient with respect
to the *effective* weight, non-zero at inactive positions), all ``(rows, K)``. They return the new mask;
the caller zeroes newly grown weights and resets their optimizer state.

Speed: a whole-layer ``topk`` runs on one thread and is slow on millions of entries, so
:func:`top_in_layer` first keeps the candidates above a threshold estimated from a fixed strided sample,
then ranks only those (exact: it falls back to a full ``topk`` when the estimate keeps too few). Per-row
selections use one ``topk`` along K for all rows at once. All choices are deterministic, so every DDP rank
computes the same masks from the same inputs.
"""

from __future__ import annotations

import math

import torch

_SAMPLE = 1 << 15  # entries sampled to estimate a layer-wide threshold
_EXACT_BELOW = 1 << 16  # smaller tensors go straight to topk


def top_in_layer(score: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask (``score``'s shape) of the ``n`` largest entries of the whole tensor.

    Entries meant never to be chosen should score ``-1`` (scores are magnitudes, so >= 0 otherwise).
    """
    flat = score.reshape(-1)
    total = flat.numel()
    out = torch.zeros(total, dtype=torch.bool, device=score.device)
    if n <= 0:
        return out.reshape(score.shape)
    if n >= total:
        return out.fill_(True).reshape(score.shape)
    idx = None
    if total > _EXACT_BELOW and n < total // 4:
        step = total // _SAMPLE
        sample = flat[::step]
        # Sample rank that leaves about twice the expected count (plus slack) above the threshold.
        above = min(sample.numel(), math.ceil(2 * n / step) + 64)
        tau = torch.topk(sample, above, sorted=False).values.min()
        cand = (flat >= tau).nonzero().squeeze(1)
        if n <= cand.numel() < total // 2:
            idx = cand[torch.topk(flat[cand], n, sorted=False).indices]
    if idx is None:
        idx = torch.topk(flat, n, sorted=False).indices
    out[idx] = True
    return out.reshape(score.shape)


def top_in_rows(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest scores of every row of ``score`` ``(rows, K)`` (one ``topk``).

    (Packing the candidates above a sampled threshold before ranking was tried: no faster on CPU.)
    """
    out = torch.zeros_like(score, dtype=torch.bool)
    if k >= score.shape[1]:
        return out.fill_(True)
    if k > 0:
        out.scatter_(1, torch.topk(score, k, dim=1, sorted=False).indices, True)
    return out


def _abs(x: torch.Tensor, finite: bool = False) -> torch.Tensor:
    """``|x|`` as a new float32 tensor; ``finite=True`` also maps NaN to 0 and inf to the largest float."""
    a = x.detach().float().abs()
    return a.nan_to_num_(0.0, posinf=torch.finfo(torch.float32).max) if finite else a


def drop_lowest(mask: torch.Tensor, w_abs: torch.Tensor, drop_fraction: float) -> tuple[torch.Tensor, int]:
    """Drop ``int(drop_fraction * active)`` active weights of lowest ``|w|`` in the layer.

    Only the active positions are ranked (an active weight may be exactly 0, like an inactive one).
    Returns ``(kept, n_dropped)``; ``kept`` is a subset of ``mask``.
    """
    active = mask.reshape(-1).nonzero().squeeze(1)
    n_drop = int(active.numel() * drop_fraction)
    kept = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    if n_drop == 0:
        return mask.clone(), 0
    chosen = top_in_layer(w_abs.reshape(-1)[active], active.numel() - n_drop)
    kept[active[chosen]] = True
    return kept.reshape(mask.shape), n_drop


def rigl_update(mask: torch.Tensor, w: torch.Tensor, g: torch.Tensor, drop_fraction: float) -> torch.Tensor:
    """RigL: drop the lowest ``|w|``, grow as many of the highest ``|g|`` among the now-inactive positions.

    The count of active weights is unchanged (unstructured, per layer).
    """
    kept, n_drop = drop_lowest(mask, _abs(w), drop_fraction)
    return kept | top_in_layer(_abs(g, finite=True).masked_fill_(kept, -1.0), n_drop)


def fill_rows(kept: torch.Tensor, w_abs: torch.Tensor, g_abs: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly ``k`` per row: kept weights first (largest ``|w|`` if a row holds more than ``k``), then the
    inactive positions with the largest ``|g|``. ``g_abs`` is overwritten (it is scratch space)."""
    new = top_in_rows(g_abs.masked_fill_(kept, math.inf), k)
    over = (kept.sum(1) > k).nonzero().squeeze(1)
    if over.numel():  # rows whose kept weights outnumber k: keep their largest magnitudes
        new[over] = top_in_rows(w_abs[over].masked_fill(~kept[over], -1.0), k)
    return new


def alive_neurons(
    kept: torch.Tensor, grow_score: torch.Tensor, n_drop: int, threshold: int, min_alive: int
) -> torch.Tensor:
    """SRigL neuron ablation: bool ``(rows,)``, False for neurons to ablate.

    A neuron's salient weights are its kept weights plus its share of the layer's ``n_drop`` best grow
    candidates (highest ``grow_score`` = ``|g|``, with -1 at kept positions). A neuron with fewer than
    ``threshold`` salient weights is ablated - but never below ``min_alive`` neurons (the safety rule: the
    survivors must be able to hold the layer's budget at no more than the dense fan-in), the most salient
    ones being kept.
    """
    salient = kept | top_in_layer(grow_score, n_drop)
    counts = salient.sum(1)
    alive = counts >= threshold
    if int(alive.sum()) < min_alive:
        order = torch.sort(counts, descending=True, stable=True).indices
        alive[order[:min_alive]] = True
    return alive


def srigl_update(
    mask: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    drop_fraction: float,
    budget: int,
    threshold: int = 0,
    ablate: bool = True,
) -> tuple[torch.Tensor, int]:
    """SRigL: constant fan-in with neuron ablation. Returns ``(new_mask, k)``.

    1. drop the lowest ``|w|`` of the layer (as RigL);
    2. ablate neurons with fewer than ``threshold`` salient weights (:func:`alive_neurons`), unless
       ``ablate`` is False (the classifier, listed modules);
    3. share the layer's ``budget`` (weights) over the alive neurons: ``k = min(K, budget // alive)``;
    4. every alive neuron keeps exactly ``k`` (:func:`fill_rows`); ablated neurons keep nothing.
    """
    rows, width = mask.shape
    w_abs, g_abs = _abs(w), _abs(g, finite=True)
    kept, n_drop = drop_lowest(mask, w_abs, drop_fraction)
    if ablate and threshold > 0:
        min_alive = min(rows, math.ceil(budget / width))
        alive = alive_neurons(kept, g_abs.masked_fill_(kept, -1.0), n_drop, threshold, min_alive)
    else:
        alive = torch.ones(rows, dtype=torch.bool, device=mask.device)
    n_alive = int(alive.sum())
    k = min(width, budget // max(1, n_alive))
    new = fill_rows(kept, w_abs, g_abs, k)
    if n_alive < rows:
        new &= alive[:, None]
    return new, k


def nm_update(
    mask: torch.Tensor, w: torch.Tensor, g: torch.Tensor, drop_fraction: float, n: int, m: int
) -> torch.Tensor:
    """N:M variant: drop the lowest ``|w|`` of the layer, then refill every group of M to exactly N from
    its own inactive positions by ``|g|`` (a group that lost nothing is unchanged). Always valid N:M."""
    rows, width = mask.shape
    kept, _ = drop_lowest(mask, _abs(w), drop_fraction)
    score = _abs(g, finite=True).masked_fill_(kept, math.inf).reshape(rows * width // m, m)
    return top_in_rows(score, n).reshape(rows, width)
