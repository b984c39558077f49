"""Prune/grow rules on (rows, K) views: exact counts, the right indices, vectorised."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semisparse.dst import prune_grow
from semisparse.patterns import fanin_mask, is_nm, nm_mask


def _distinct(shape, seed):
    """Distinct magnitudes (a random permutation), so the expected selections are unique."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(shape[0] * shape[1], generator=g).float() + 1).reshape(shape)


@pytest.mark.parametrize("total,n", [(100, 7), (300_000, 5), (300_000, 9_000), (300_000, 70_000)])
def test_top_in_layer_is_exact_topk(total, n):
    g = torch.Generator().manual_seed(total + n)
    score = torch.randn(total, generator=g).abs().reshape(-1, 100)
    score[:, :10] = -1.0  # never chosen
    got = prune_grow.top_in_layer(score, n)
    expect = torch.zeros(total, dtype=torch.bool)
    expect[torch.topk(score.reshape(-1), n).indices] = True
    assert torch.equal(got.reshape(-1), expect)


def test_top_in_layer_with_massive_ties_falls_back_exactly():
    score = torch.zeros(200_000)
    score[123] = 5.0
    score[77_777] = 3.0
    got = prune_grow.top_in_layer(score, 2)
    assert got.nonzero().flatten().tolist() == [123, 77_777]
    assert int(prune_grow.top_in_layer(score, 1_000).sum()) == 1_000


def test_rigl_grows_topk_dense_grad_over_inactive():
    rows, k = 6, 20
    w, g = _distinct((rows, k), 1), _distinct((rows, k), 2)
    mask = fanin_mask(torch.rand(rows, k, generator=torch.Generator().manual_seed(3)), 5)
    new = prune_grow.rigl_update(mask, w, g, 0.4)
    n_active = int(mask.sum())
    n_drop = int(0.4 * n_active)
    # Kept: the highest |w| among active weights of the whole layer.
    wa = torch.where(mask, w, torch.tensor(-1.0)).reshape(-1)
    kept = torch.zeros(rows * k, dtype=torch.bool)
    kept[torch.topk(wa, n_active - n_drop).indices] = True
    # Grown: topk(|g|) over the positions inactive after the drop.
    ga = torch.where(kept, torch.tensor(-1.0), g.reshape(-1))
    grown = torch.zeros(rows * k, dtype=torch.bool)
    grown[torch.topk(ga, n_drop).indices] = True
    assert torch.equal(new.reshape(-1), kept | grown)
    assert int(new.sum()) == n_active


def test_srigl_keeps_largest_magnitudes_not_lowest_indices():
    # Row 0 holds 4 active weights; the budget per neuron drops to 2 (more neurons alive).
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, :4] = True
    w = torch.zeros(4, 8)
    w[0, :4] = torch.tensor([0.1, 0.2, 0.9, 0.8])
    g = torch.zeros(4, 8)
    g[1:, 4:6] = 1.0
    new, k = prune_grow.srigl_update(mask, w, g, 0.0, budget=8, threshold=0, ablate=False)
    assert k == 2
    assert new[0].nonzero().flatten().tolist() == [2, 3]  # the research code kept indices 0, 1
    assert (new.sum(1) == 2).all()


def test_srigl_grows_topk_gradient_per_neuron():
    rows, K, k = 5, 16, 4
    w, g = _distinct((rows, K), 4), _distinct((rows, K), 5)
    mask = fanin_mask(torch.rand(rows, K, generator=torch.Generator().manual_seed(6)), k)
    new, k_new = prune_grow.srigl_update(mask, w, g, 0.5, budget=k * rows, threshold=0, ablate=False)
    assert k_new == k
    kept, _ = prune_grow.drop_lowest(mask, w.abs(), 0.5)
    for r in range(rows):
        need = k - int(kept[r].sum())
        cand = torch.where(kept[r], torch.tensor(-1.0), g[r])
        expect = kept[r].clone()
        expect[torch.topk(cand, need).indices] = True
        assert torch.equal(new[r], expect)


def test_srigl_ablates_unsalient_neurons_and_redistributes():
    rows, K, k = 4, 10, 3
    mask = torch.zeros(rows, K, dtype=torch.bool)
    mask[:, :k] = True
    w = torch.ones(rows, K)
    w[3] = 1e-3  # neuron 3: tiny weights, dropped first
    g = torch.zeros(rows, K)
    g[:3, 5:] = 1.0  # and no gradient to regrow it
    new, k_new = prune_grow.srigl_update(mask, w * mask, g, 0.25, budget=k * rows, threshold=2)
    assert new[3].sum() == 0
    assert k_new == (k * rows) // 3 == 4
    assert (new[:3].sum(1) == 4).all()


def test_srigl_safety_rule_keeps_enough_neurons_for_the_budget():
    rows, K = 8, 4
    mask = torch.ones(rows, K, dtype=torch.bool)
    mask[:, 2:] = False
    w = torch.rand(rows, K) * mask
    g = torch.zeros(rows, K)
    budget = 16  # needs at least 4 neurons at the dense fan-in of 4
    new, k_new = prune_grow.srigl_update(mask, w, g, 0.9, budget=budget, threshold=100)
    alive = int((new.sum(1) > 0).sum())
    assert alive == 4 and k_new == 4 and int(new.sum()) == budget


def test_nm_update_refills_each_group_from_its_own_positions():
    rows, K = 4, 16
    w, g = _distinct((rows, K), 7), _distinct((rows, K), 8)
    mask = nm_mask(torch.rand(rows, K, generator=torch.Generator().manual_seed(9)), 2, 4)
    new = prune_grow.nm_update(mask, w * mask, g, 0.5, 2, 4)
    assert is_nm(new, 2, 4)
    kept, _ = prune_grow.drop_lowest(mask, (w * mask).abs(), 0.5)
    assert (new & kept).sum() == kept.sum()  # survivors stay
    for gi in range(0, K, 4):  # refills are the best |g| in their group
        for r in range(rows):
            grp_k, grp_g = kept[r, gi:gi + 4], g[r, gi:gi + 4]
            need = 2 - int(grp_k.sum())
            cand = torch.where(grp_k, torch.tensor(-1.0), grp_g)
            expect = grp_k.clone()
            if need:
                expect[torch.topk(cand, need).indices] = True
            assert torch.equal(new[r, gi:gi + 4], expect)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 12), K=st.integers(2, 40), frac=st.floats(0.0, 1.0), seed=st.integers(0, 10_000),
    density=st.floats(0.05, 0.9), thr=st.integers(0, 6),
)
def test_srigl_property_constant_fanin_and_budget(rows, K, frac, seed, density, thr):
    gen = torch.Generator().manual_seed(seed)
    k = max(1, int(density * K))
    mask = fanin_mask(torch.rand(rows, K, generator=gen), k)
    w = torch.randn(rows, K, generator=gen) * mask
    g = torch.randn(rows, K, generator=gen)
    new, k_new = prune_grow.srigl_update(mask, w, g, frac, budget=k * rows, threshold=thr)
    counts = new.sum(1)
    assert ((counts == k_new) | (counts == 0)).all()
    assert 1 <= k_new <= K
    assert int(new.sum()) <= k * rows
    alive = int((counts > 0).sum())
    assert k_new == min(K, (k * rows) // alive)
    assert alive * K >= k * rows or alive == rows  # safety: the survivors can hold the budget


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 10), K=st.integers(1, 40), frac=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_rigl_property_count_preserved(rows, K, frac, seed):
    gen = torch.Generator().manual_seed(seed)
    n = max(1, rows * K // 3)
    mask = prune_grow.top_in_layer(torch.rand(rows, K, generator=gen), n)
    w, g = torch.randn(rows, K, generator=gen) * mask, torch.randn(rows, K, generator=gen)
    new = prune_grow.rigl_update(mask, w, g, frac)
    assert int(new.sum()) == n


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), groups=st.integers(1, 8), nm=st.sampled_from([(1, 4), (2, 4), (4, 8), (1, 2)]),
       frac=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_nm_property_always_valid(rows, groups, nm, frac, seed):
    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    mask = nm_mask(torch.rand(rows, groups * m, generator=gen), n, m)
    new = prune_grow.nm_update(mask, torch.randn(rows, groups * m, generator=gen) * mask,
                          torch.randn(rows, groups * m, generator=gen), frac, n, m)
    assert is_nm(new, n, m)


@pytest.mark.parametrize("rows,width,k", [(64, 4608, 46), (300, 1152, 20), (8, 2048, 1), (50, 4096, 300)])
def test_top_in_rows_is_exact_per_row_topk(rows, width, k):
    g = torch.Generator().manual_seed(rows + width + k)
    score = torch.rand(rows, width, generator=g)
    score[0] = 0.0  # all ties: must still keep exactly k
    score[1, : k // 2 + 1] = float("inf")
    score[2, ::7] = -1.0
    score[3, -(k + 3):] = 10.0  # the winners sit where the strided sample sees few of them
    got = prune_grow.top_in_rows(score, k)
    assert (got.sum(1) == k).all()
    expect = torch.zeros_like(got).scatter_(1, torch.topk(score, k, dim=1).indices, True)
    assert torch.equal(got[1:], expect[1:])
