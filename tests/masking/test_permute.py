"""Channel permutation: same function, more magnitude kept by N:M, clear limits."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import semisparse as ss
from semisparse.layout import plan
from semisparse.masking.permute import (
    _topn_sum,
    channel_spaces,
    kept_fraction,
    permute_channels,
    search_permutation,
)
from semisparse.patterns import NM


def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so a wrong permutation shows."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    for name, p in model.named_parameters():
        if name.endswith("layer_scale"):
            with torch.no_grad():
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "mobilenet_v3_small"])
def test_permuted_torchvision_model_computes_the_same_outputs(name):
    torch.manual_seed(0)
    model = randomize_norms(getattr(torchvision.models, name)(weights=None)).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    result = permute_channels(model, NM(2, 4), plan(model, NM(2, 4)), rounds=1, max_rows=64)
    assert len(result.gains) >= 10  # most layers were permuted...
    before = ref.state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 20
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)  # ...and the function is the same
    before, after = zip(*result.gains.values())
    assert sum(after) > sum(before)  # the joint objective of each channel space rose


def test_permutation_keeps_more_magnitude_on_random_64x128():
    gains, gaps = [], []
    for seed in range(2):
        torch.manual_seed(seed)
        w = torch.randn(64, 128)
        perm = search_permutation([w], NM(2, 4), rounds=20, patience=5)
        assert torch.equal(perm.sort().values, torch.arange(128))
        before, after = kept_fraction([w], NM(2, 4)), kept_fraction([w], NM(2, 4), perm)
        bound = float(w.abs().flatten().topk(w.numel() // 2).values.sum() / w.abs().sum())
        gains.append(after - before)
        gaps.append((after - before) / (bound - before))
    assert min(gains) > 0.01  # about 2.3 points of |w| share
    assert min(gaps) > 0.25  # a good share of the way to the unstructured 50% bound


def test_sparsify_permute_reports_gain_and_keeps_the_dense_function():
    torch.manual_seed(0)
    model = randomize_norms(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )
    ).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    rep = ss.sparsify(model, "2:4", permute=True)
    gained = [r for r in rep.layers if "kept_after_perm" in r.extra]
    assert {r.name for r in gained} == {"3.weight", "8.weight"}
    assert all(r.extra["kept_after_perm"] > r.extra["kept_before_perm"] for r in gained)
    assert any("channel permutation" in n for n in rep.notes)
    ss.check(model)
    # the dense function underneath is unchanged: compare with the masks lifted
    dense = {sw_key: p for sw_key, p in ss.masks(model).items()}
    ss.sparsify(model, masks={k: torch.ones_like(v) for k, v in dense.items()}, pattern=None, overwrite=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_permutation_then_magnitude_keeps_more_than_plain_magnitude():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    plain, perm = copy.deepcopy(base), copy.deepcopy(base)
    ss.sparsify(plain, "2:4")
    ss.sparsify(perm, "2:4", permute=True)

    def kept(m):
        return sum(float(sw.detach().abs().sum()) for n, sw in m.named_parameters() if n.endswith("original"))

    def kept_masked(m):
        return sum(float(m.get_submodule(k.rpartition(".")[0]).weight.detach().abs().sum()) for k in ss.masks(m))

    assert kept(plain) == pytest.approx(kept(perm), rel=1e-5)  # same weights, reordered
    assert kept_masked(perm) > kept_masked(plain)


def test_spaces_that_reach_unknown_ops_are_left_alone():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 1))

    model = Cat()
    ref = copy.deepcopy(model)
    spaces = channel_spaces(model)
    assert any("cat" in s.blocked for s in spaces)
    result = permute_channels(model, NM(2, 4), plan(model, NM(2, 4)))
    assert "c.weight" not in result.gains
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


def test_permute_needs_nm_and_a_dense_model():
    with pytest.raises(ss.SemisparseError, match="N:M"):
        ss.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), 0.5, permute=True)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    ss.sparsify(m, "2:4")
    with pytest.raises(ss.SemisparseError, match="dense model"):
        ss.sparsify(m, "2:4", permute=True, overwrite=True)


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 8)

        def forward(self, x):
            if x.sum() > 0:
                return self.l(x)
            return x

    with pytest.raises(ss.SemisparseError, match="torch.fx"):
        ss.sparsify(Branchy(), "2:4", permute=True)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 8), n=st.integers(1, 7), seed=st.integers(0, 100))
def test_property_sorting_network_sums_the_top_n(m, n, seed):
    n = min(n, m - 1)
    x = torch.randn(m, 5, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(_topn_sum(x.unbind(0), n), x.topk(n, dim=0).values.sum(0))
