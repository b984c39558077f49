"""Layer budgets (uniform, ERK) and the update schedule."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semisparse import SemisparseError
from semisparse.dst.budgets import count_budgets, erk_densities, fanin_budgets, layer_densities, uniform_densities
from semisparse.dst.schedule import UpdateSchedule

SHAPES = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (128, 64), (10, 128)]


def test_erk_densities_match_the_formula():
    s = 0.9
    d = erk_densities(SHAPES, s)
    raw = [sum(sh) / math.prod(sh) for sh in SHAPES]
    numel = [math.prod(sh) for sh in SHAPES]
    dense = [i for i, v in enumerate(d) if v == 1.0]
    rest = [i for i in range(len(SHAPES)) if i not in dense]
    # One eps for every non-dense layer, solving the exact total.
    eps = ((1 - s) * sum(numel) - sum(numel[i] for i in dense)) / sum(raw[i] * numel[i] for i in rest)
    for i in rest:
        assert d[i] == pytest.approx(eps * raw[i], rel=1e-12)
    assert sum(di * n for di, n in zip(d, numel)) == pytest.approx((1 - s) * sum(numel), rel=1e-12)


def test_erk_small_layers_denser_and_overflow_made_dense():
    d = erk_densities(SHAPES, 0.5)
    assert d[0] == 1.0  # the 3-channel stem overflows and is made dense
    assert d[0] >= d[1] >= d[2]
    numel = [math.prod(sh) for sh in SHAPES]
    assert sum(di * n for di, n in zip(d, numel)) == pytest.approx(0.5 * sum(numel), rel=1e-12)


def test_erk_power_scale_zero_is_uniform():
    assert erk_densities(SHAPES, 0.8, power_scale=0.0) == pytest.approx(uniform_densities(SHAPES, 0.8))


def test_fanin_budgets_are_floored_and_at_least_one():
    assert fanin_budgets([(4, 100), (4, 7)], [0.1, 0.1]) == [10, 1]
    assert fanin_budgets([(4, 3, 3, 3)], [0.5]) == [13]  # floor(13.5)
    assert count_budgets([(10, 10)], [0.055]) == [5]


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3])), min_size=1,
                    max_size=6),
    s=st.floats(0.05, 0.99),
    dist=st.sampled_from(["erk", "uniform"]),
)
def test_total_sparsity_exact_up_to_rounding(shapes, s, dist):
    shapes = [(o, i, k, k) for o, i, k in shapes]
    d = layer_densities(shapes, s, dist)
    assert all(0 < v <= 1.0 for v in d)
    numel = [math.prod(sh) for sh in shapes]
    kept = sum(di * n for di, n in zip(d, numel))
    if max(d) < 1.0 or dist == "erk":
        assert kept == pytest.approx((1 - s) * sum(numel), rel=1e-9) or all(v == 1.0 for v in d)
    ks = fanin_budgets(shapes, d)
    for k, sh, di in zip(ks, shapes, d):
        fan_in = math.prod(sh[1:])
        assert k == max(1, math.floor(di * fan_in + 1e-9))


@pytest.mark.parametrize("s", [0.0, 1.0, -0.1, 1.5, "0.9", True, None])
def test_bad_sparsity_is_a_clear_error(s):
    with pytest.raises(SemisparseError, match="sparsity"):
        uniform_densities(SHAPES, s)


def test_unknown_distribution():
    with pytest.raises(SemisparseError, match="distribution"):
        layer_densities(SHAPES, 0.9, "gaussian")


def test_schedule_updates_every_delta_until_t_end():
    sch = UpdateSchedule(delta=10, t_end=35, alpha=0.3)
    assert [t for t in range(1, 60) if sch.is_update(t)] == [10, 20, 30]
    assert sch.drop_fraction(0) == pytest.approx(0.3)
    assert sch.drop_fraction(35 / 2) == pytest.approx(0.15)
    assert sch.drop_fraction(35) == 0.0
    assert not any(UpdateSchedule(delta=1, t_end=100, static=True).is_update(t) for t in range(200))


@pytest.mark.parametrize("kw,match", [
    ({"delta": 0}, "delta"), ({"delta": -5}, "delta"), ({"delta": 1.5}, "delta"),
    ({"t_end": 0}, "t_end"), ({"t_end": -1}, "t_end"), ({"alpha": 1.5}, "alpha"),
])
def test_schedule_bad_input(kw, match):
    with pytest.raises(SemisparseError, match=match):
        UpdateSchedule(**{"delta": 10, "t_end": 100, **kw})
