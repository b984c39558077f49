"""Pure mask math on a 2-D view ``(rows, K)``: one row per output neuron, K along the reduction axis.

Nothing here knows about modules; :mod:`semisparse.layout` turns a layer's weight into this view.
Two structures are supported:

* **N:M** - in every group of M consecutive entries along K, exactly N are kept (K % M == 0).
* **constant fan-in** - every row keeps exactly k entries (SRigL's structure; N:M is a special case).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cache

import torch

from .errors import PatternError, SemisparseError

#: The largest pattern table a learned mask may use (C(8, 4) = 70).
MAX_PATTERNS = 70


@dataclass(frozen=True)
class NM:
    """N kept of every M consecutive weights along the reduction axis."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise SemisparseError(f"N:M pattern needs integers 0 < N < M, got {self.n}:{self.m}")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m


@dataclass(frozen=True)
class FanIn:
    """Constant fan-in at a target sparsity: every output neuron keeps ``k = fanin_k(K, sparsity)``."""

    sparsity: float

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 < float(s) < 1.0):
            raise SemisparseError(f"sparsity must be a float in (0, 1), got {s!r}")

    def __str__(self) -> str:
        return f"fan-in {self.sparsity:g}"

    def k(self, fan_in: int) -> int:
        return fanin_k(fan_in, self.sparsity)


Pattern = NM | FanIn


def parse_pattern(pattern: str | float | NM | FanIn) -> NM | FanIn:
    """``"2:4"`` -> ``NM(2, 4)``; a float ``s`` in (0, 1) -> ``FanIn(s)``.

    Raises :class:`SemisparseError` with the expected forms otherwise.
    """
    if isinstance(pattern, (NM, FanIn)):
        return pattern
    if isinstance(pattern, bool):
        raise SemisparseError(f'pattern must be "N:M" (e.g. "2:4") or a sparsity in (0, 1), got {pattern!r}')
    if isinstance(pattern, (int, float)):
        return FanIn(float(pattern))
    if isinstance(pattern, str):
        text = pattern.strip()
        if ":" in text:
            a, _, b = text.partition(":")
            try:
                n, m = int(a), int(b)
            except ValueError:
                raise SemisparseError(f'pattern must be "N:M" with integers, e.g. "2:4", got {pattern!r}') from None
            return NM(n, m)
        try:
            return FanIn(float(text))
        except ValueError:
            pass
    raise SemisparseError(f'pattern must be "N:M" (e.g. "2:4") or a sparsity in (0, 1), got {pattern!r}')


def fanin_k(fan_in: int, sparsity: float) -> int:
    """Weights kept per output neuron at ``sparsity``: ``max(1, round((1 - s) * fan_in))``."""
    return max(1, min(fan_in, round((1.0 - sparsity) * fan_in)))


@cache
def _pattern_table(n: int, m: int) -> torch.Tensor:
    combos = list(itertools.combinations(range(m), n))
    table = torch.zeros(len(combos), m, dtype=torch.bool)
    for i, keep in enumerate(combos):
        table[i, list(keep)] = True
    return table


def pattern_table(n: int, m: int) -> torch.Tensor:
    """The C(M, N) keep-patterns of one group as a bool tensor ``(C(M,N), M)``, in lexicographic order.

    A fresh copy each call: the cached original can never be modified (the masking seed made its table
    trainable, so every "mask" went dense after one step).
    """
    NM(n, m)
    if math.comb(m, n) > 10_000:
        raise SemisparseError(f"{n}:{m} has {math.comb(m, n)} patterns; at most 10000 can be enumerated")
    return _pattern_table(n, m).clone()


def _check_view(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise SemisparseError(f"expected a 2-D (rows, K) view, got shape {tuple(scores.shape)}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N largest ``scores`` of every group of M along K. ``scores``: ``(rows, K)``, K % M == 0.

    Ties go to the lower index (a stable sort decides, so masks are reproducible across runs).
    """
    NM(n, m)
    _check_view(scores)
    rows, k = scores.shape
    if k % m:
        raise SemisparseError(f"reduction length {k} is not a multiple of M={m}")
    groups = scores.detach().reshape(rows, k // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(rows, k)


def shared_row_scores(scores: torch.Tensor, rows: int) -> torch.Tensor:
    """Each row's scores replaced by their sum over its block of ``rows`` consecutive rows (the last block may
    be shorter): N:M or top-k on them keeps the same columns in every row of a block, which lets a CPU kernel
    feed one loaded input to all the block's rows. Each row still has the pattern on its own."""
    _check_view(scores)
    if rows == 1:
        return scores
    R, K = scores.shape
    pad = -R % rows
    padded = torch.cat([scores, scores.new_zeros(pad, K)]) if pad else scores
    sums = padded.view(-1, rows, K).sum(1)
    return sums.repeat_interleave(rows, 0)[:R]


def fanin_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest ``scores`` of every row (constant fan-in). ``scores``: ``(rows, K)``."""
    _check_view(scores)
    rows, width = scores.shape
    if not 0 < k <= width:
        raise SemisparseError(f"fan-in k must be in [1, {width}], got {k}")
    order = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros(rows, width, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, order, True)
    return mask


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of M along K of the ``(rows, K)`` mask keeps exactly N."""
    _check_view(mask)
    rows, k = mask.shape
    if k % m:
        return False
    return bool((mask.reshape(rows, k // m, m).sum(-1) == n).all())


def fanin_counts(mask: torch.Tensor) -> torch.Tensor:
    """Kept entries per row of a ``(rows, K)`` mask."""
    _check_view(mask)
    return mask.sum(dim=1)


def is_constant_fanin(mask: torch.Tensor, k: int) -> bool:
    """True when every row keeps exactly ``k`` entries, or none (an ablated neuron)."""
    counts = fanin_counts(mask)
    return bool(((counts == k) | (counts == 0)).all())


def check_view(mask: torch.Tensor, pattern: NM | FanIn | int, where: str) -> None:
    """Raise :class:`PatternError` naming ``where`` if the ``(rows, K)`` mask breaks ``pattern``.

    ``pattern`` is an :class:`NM`, or the fan-in ``k`` itself as an int.
    """
    if isinstance(pattern, NM):
        if not is_nm(mask, pattern.n, pattern.m):
            rows, k = mask.shape
            bad = (mask.reshape(rows, k // pattern.m, pattern.m).sum(-1) != pattern.n).nonzero()
            r, g = (int(v) for v in bad[0]) if len(bad) else (0, 0)
            raise PatternError(
                f"{where}: mask is not {pattern} (row {r}, group {g} keeps a different count); "
                f"every group of {pattern.m} must keep exactly {pattern.n}"
            )
    else:
        k = pattern if isinstance(pattern, int) else None
        if k is None:
            raise PatternError(f"{where}: a fan-in check needs the layer's k")
        counts = fanin_counts(mask)
        bad = ((counts != k) & (counts != 0)).nonzero()
        if len(bad):
            r = int(bad[0])
            raise PatternError(
                f"{where}: row {r} keeps {int(counts[r])} weights; constant fan-in needs exactly {k} (or 0)"
            )
