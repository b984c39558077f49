"""The SparseGPT column sweep: choose a structured mask and reconstruct the kept weights from a Hessian.

Pure math on a ``(rows, K)`` weight view whose K columns all read the same inputs, with ``H = sum x x^T``
over those inputs, ``(K, K)``. Columns are visited left to right; when a column's weights are pruned, each
row's error is spread over the columns not yet visited by the Optimal Brain Surgeon update

    W[r, i:] -= W[r, i] / [inv(H[i:, i:])]_00 * inv(H[i:, i:])[0, :]

(the rows of every ``inv(H[i:, i:])`` come at once from the upper Cholesky factor of ``inv(H)``). The mask
is chosen as the sweep goes: at the start of each group of M columns (N:M) the ``M - N`` weights with the
smallest ``w^2 / [inv(H[j:, j:])]_00`` are pruned in every row; for constant fan-in every row prunes the same
number of weights in each block of columns, so each row keeps exactly ``k`` in the end. With ``shared_rows``
the saliency is summed over each block of that many consecutive rows before choosing (the pruned outputs' error
adds up over the block), so the block prunes the same columns; each row's reconstruction stays its own.

Dampening and dead inputs as SparseGPT: an input that is always zero gets ``H_ii = 1`` and weight 0 (it
cannot affect the outputs on the calibration data); ``dampening * mean(diag H)`` is added to the diagonal.
The solve runs in float64.
"""

from __future__ import annotations

import torch

from ..errors import SemisparseError
from ..patterns import NM, shared_row_scores


class NotFactorable(SemisparseError):
    """The dampened Hessian of a layer is not positive definite."""


def inverse_cholesky(h: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of ``inv(H + damp)`` in float64, dead-input mask). ``h``: ``(K, K)``."""
    h = h.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    diag = torch.diagonal(h)
    diag += dampening * diag.mean()
    # With R upper triangular and H = R R^T (the Cholesky factor of H with its index order reversed, flipped
    # back), inv(H) = inv(R)^T inv(R): inv(R) is the wanted factor, from one Cholesky and one triangular solve
    # (torch's cholesky_inverse is several times slower on CPU).
    flipped, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info) != 0 or not bool(torch.isfinite(flipped).all()):
        raise NotFactorable("Hessian not positive definite")
    r = flipped.flip(0, 1)
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    upper = torch.linalg.solve_triangular(r, eye, upper=True)
    if not bool(torch.isfinite(upper).all()):
        raise NotFactorable("inverse Hessian not finite")
    return upper, dead


def _prune_counts(width: int, pruned: int, start: int, stop: int) -> int:
    """Weights each row prunes in columns ``[start, stop)`` so that the total over all blocks is ``pruned``."""
    return round(stop * pruned / width) - round(start * pruned / width)


def column_sweep(
    w: torch.Tensor,
    h: torch.Tensor,
    target: NM | int,
    *,
    dampening: float = 0.01,
    blocksize: int = 128,
    pad_cols: torch.Tensor | None = None,
    shared_rows: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructed weights, bool keep-mask), both ``(rows, K)``, for ``w`` under ``target``.

    ``target``: an :class:`NM` (groups of M consecutive columns) or the fan-in ``k`` kept per row.
    ``pad_cols`` (K,) marks padding columns (kernel-tap layouts): pruned before any real weight.
    ``shared_rows``: blocks of that many consecutive rows (the last may be shorter) keep the same columns.
    Raises :class:`NotFactorable` when the dampened Hessian has no Cholesky factor.
    """
    rows, width = w.shape
    upper, dead = inverse_cholesky(h, dampening)
    w = w.to(torch.float64).clone()
    w[:, dead] = 0
    mask = torch.ones(rows, width, dtype=torch.bool, device=w.device)
    if isinstance(target, NM):
        m, prune_n = target.m, target.m - target.n
        blocksize = max(m, blocksize // m * m)
    else:
        pruned = width - int(target)
    never = torch.zeros(width, dtype=torch.bool, device=w.device) if pad_cols is None else pad_cols.to(w.device)
    diag = torch.diagonal(upper)
    for i1 in range(0, width, blocksize):
        i2 = min(i1 + blocksize, width)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        d1 = diag[i1:i2]
        if not isinstance(target, NM):
            count = _prune_counts(width, pruned, i1, i2)
            if count:
                score = shared_row_scores(w1.square() / d1.square(), shared_rows)
                score[:, never[i1:i2]] = float("-inf")
                idx = torch.sort(score, dim=1, stable=True).indices[:, :count]
                mask[:, i1:i2].scatter_(1, idx, False)
        # Columns go in steps of one N:M group (or one column for fan-in): the group's own columns are
        # updated one after another, the rest of the block once per step with a matmul.
        step = m if isinstance(target, NM) else 1
        for i in range(0, i2 - i1, step):
            col = i1 + i
            j2 = min(i + step, i2 - i1)
            if isinstance(target, NM):
                score = shared_row_scores(w1[:, i:j2].square() / d1[i:j2].square(), shared_rows)
                score[:, never[col:col + j2 - i]] = float("-inf")
                idx = torch.sort(score, dim=1, stable=True).indices[:, :prune_n]
                mask[:, col:col + j2 - i].scatter_(1, idx, False)
            for j in range(i, j2):
                keep = mask[:, i1 + j]
                e = torch.where(keep, 0.0, w1[:, j]) / u1[j, j]
                if j + 1 < j2:
                    w1[:, j + 1:j2] -= e[:, None] * u1[j, j + 1:j2][None, :]
                w1[:, j] = torch.where(keep, w1[:, j], 0.0)
                err1[:, j] = e
            if j2 < i2 - i1:
                w1[:, j2:] -= err1[:, i:j2] @ u1[i:j2, j2:]
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    return w, mask


def output_error(w: torch.Tensor, w_new: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
    """(``||(W - W') X||^2``, ``||W X||^2``) summed over the calibration inputs, from ``H = X X^T``."""
    h = h.to(torch.float64)
    delta = (w.to(torch.float64) - w_new.to(torch.float64))
    num = float(((delta @ h) * delta).sum())
    den = float(((w.to(torch.float64) @ h) * w.to(torch.float64)).sum())
    return max(num, 0.0), max(den, 0.0)
