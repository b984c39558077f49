"""Mask math: exact N:M and constant fan-in, top scores kept, the constant pattern table."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from semisparse import NM, FanIn, PatternError, SemisparseError, parse_pattern
from semisparse.patterns import (
    check_view,
    fanin_k,
    fanin_mask,
    is_constant_fanin,
    is_nm,
    nm_mask,
    pattern_table,
    shared_row_scores,
)


@st.composite
def nm_case(draw):
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    rows = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    scores = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    return scores, n, m


@settings(max_examples=200, deadline=None)
@given(nm_case())
def test_nm_mask_keeps_exactly_n_top_scores_per_group(case):
    scores, n, m = case
    mask = nm_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    g = mask.reshape(scores.shape[0], -1, m)
    s = scores.reshape(scores.shape[0], -1, m)
    assert bool((g.sum(-1) == n).all())
    # every kept score is >= every dropped score of the same group
    kept_min = torch.where(g, s, torch.full_like(s, math.inf)).amin(-1)
    dropped_max = torch.where(~g, s, torch.full_like(s, -math.inf)).amax(-1)
    assert bool((kept_min >= dropped_max).all())
    assert is_nm(mask, n, m)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.data())
def test_fanin_mask_keeps_exactly_k_largest_per_row(rows, width, data):
    k = data.draw(st.integers(1, width))
    scores = torch.randn(rows, width)
    mask = fanin_mask(scores, k)
    assert bool((mask.sum(1) == k).all())
    kept_min = torch.where(mask, scores, torch.full_like(scores, math.inf)).amin(1)
    dropped_max = torch.where(~mask, scores, torch.full_like(scores, -math.inf)).amax(1)
    assert bool((kept_min >= dropped_max).all())
    assert is_constant_fanin(mask, k)


def test_ties_go_to_lower_index_reproducibly():
    scores = torch.ones(3, 8)
    mask = nm_mask(scores, 2, 4)
    assert mask[0].tolist() == [True, True, False, False] * 2
    assert torch.equal(mask, nm_mask(scores, 2, 4))


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (4, 8), (2, 8)])
def test_pattern_table_lists_every_n_of_m_pattern_once(n, m):
    table = pattern_table(n, m)
    assert table.shape == (math.comb(m, n), m)
    assert bool((table.sum(1) == n).all())
    assert len({tuple(r.tolist()) for r in table}) == math.comb(m, n)


def test_pattern_table_cannot_be_modified_through_a_returned_copy():
    t = pattern_table(2, 4)
    t.fill_(True)
    assert bool((pattern_table(2, 4).sum(1) == 2).all())


@pytest.mark.parametrize("fan_in,s,k", [(100, 0.9, 10), (9, 0.9, 1), (3, 0.99, 1), (768, 0.8, 154), (5, 0.5, 2)])
def test_fanin_k_is_max_1_round(fan_in, s, k):
    assert fanin_k(fan_in, s) == k == max(1, round((1 - s) * fan_in))


@pytest.mark.parametrize(
    "text,expected", [("2:4", NM(2, 4)), (" 1:4 ", NM(1, 4)), (0.9, FanIn(0.9)), ("0.5", FanIn(0.5))]
)
def test_parse_pattern_accepts_nm_and_sparsity(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("bad", ["3:2", "0:4", "2:2", "a:b", 1.5, -0.1, 0.0, 1.0, True, "dense", None])
def test_parse_pattern_rejects_bad_input_with_expected_forms(bad):
    with pytest.raises(SemisparseError, match="N:M|sparsity"):
        parse_pattern(bad)


def test_check_view_names_the_layer_and_row():
    mask = nm_mask(torch.randn(4, 8), 2, 4)
    check_view(mask, NM(2, 4), "fc.weight")
    mask[2, 5] = ~mask[2, 5]
    with pytest.raises(PatternError, match=r"fc\.weight.*row 2"):
        check_view(mask, NM(2, 4), "fc.weight")
    fan = fanin_mask(torch.randn(5, 10), 3)
    fan[1] = False  # an ablated neuron is allowed
    check_view(fan, 3, "conv.weight")
    fan[4, fan[4].nonzero()[0]] = False
    with pytest.raises(PatternError, match=r"conv\.weight: row 4 keeps 2"):
        check_view(fan, 3, "conv.weight")


def test_nm_mask_rejects_length_not_multiple_of_m():
    with pytest.raises(SemisparseError, match="multiple of M=4"):
        nm_mask(torch.randn(2, 6), 2, 4)


@settings(max_examples=100, deadline=None)
@given(nm_case(), st.integers(1, 5), st.booleans())
def test_shared_rows_keep_the_same_positions_per_block_and_the_pattern_per_row(case, shared, fanin):
    """Each block of ``shared`` rows (the last one shorter) keeps the positions with the largest summed
    scores of the block; every row is still N:M / constant fan-in."""
    scores, n, m = case
    shared_scores = shared_row_scores(scores, shared)
    mask = fanin_mask(shared_scores, n) if fanin else nm_mask(shared_scores, n, m)
    assert is_constant_fanin(mask, n) if fanin else is_nm(mask, n, m)
    for start in range(0, scores.shape[0], shared):
        block = slice(start, start + shared)
        assert bool((mask[block] == mask[start]).all())
        want = fanin_mask(scores[block].sum(0, keepdim=True), n) if fanin else nm_mask(
            scores[block].sum(0, keepdim=True), n, m)
        assert torch.equal(mask[start:start + 1], want)


def test_shared_row_scores_of_one_row_are_the_scores():
    scores = torch.randn(5, 8)
    assert shared_row_scores(scores, 1) is scores
