"""ss.deploy on model structures beyond a plain chain: folded chains, shared modules, fresh outputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy, deployed_layers
from semisparse.runtime.cpu.layers import SparseLinear


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    assert err <= rtol, f"max relative error {err:.2e} > {rtol}"


def _ablating_masks(model: nn.Sequential, density: float, ablate: float, seed: int) -> dict[str, torch.Tensor]:
    """Random masks with a share ``ablate`` of each hidden Linear's neurons removed entirely."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    linears = [(n, m) for n, m in model.named_children() if isinstance(m, nn.Linear)]
    for i, (name, lin) in enumerate(linears):
        m = torch.rand(lin.out_features, lin.in_features, generator=g) < density
        m[torch.arange(lin.out_features), torch.randint(0, lin.in_features, (lin.out_features,), generator=g)] = True
        if i < len(linears) - 1:  # a hidden layer: some neurons ablated
            gone = torch.randperm(lin.out_features, generator=g)[: int(ablate * lin.out_features)]
            m[gone] = False
        masks[f"{name}.weight"] = m
    return masks


def test_fold_chain_of_three_linears_whose_hidden_layers_are_both_ablated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(), nn.Linear(128, 128), nn.ReLU(), nn.Dropout(),
                          nn.Linear(128, 10))
    masks = _ablating_masks(model, 0.05, 0.12, seed=1)
    ss.sparsify(model, None, masks=masks)
    x = torch.randn(5, 64)
    dep = deploy(model, plan="condensed")
    with torch.no_grad():
        assert_close(dep(x), model.eval()(x))
    gone0 = int((~masks["0.weight"].any(1)).sum())
    gone3 = int((~masks["3.weight"].any(1)).sum())
    assert dep[0].out_features == 128 - gone0
    assert (dep[3].in_features, dep[3].out_features) == (128 - gone0, 128 - gone3)
    assert dep[6].in_features == 128 - gone3
    assert dep[3].figures["dropped_inputs"] == gone0 and dep[6].figures["dropped_inputs"] == gone3


@settings(max_examples=15, deadline=None)
@given(depth=st.integers(2, 5), width=st.integers(4, 24), ablate=st.floats(0.0, 0.7), seed=st.integers(0, 99),
       act=st.sampled_from([nn.ReLU, nn.GELU, nn.Tanh]))
def test_property_folded_linear_chains_equal_masked_model(depth, width, ablate, seed, act):
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(depth):
        mods.append(nn.Linear(width if i else 8, width if i < depth - 1 else 3))
        if i < depth - 1:
            mods.append(act())
    model = nn.Sequential(*mods)
    ss.sparsify(model, None, masks=_ablating_masks(model, 0.4, ablate, seed))
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert_close(deploy(model, plan="condensed")(x), model.eval()(x))


@pytest.mark.parametrize("n,crop", [(3, False), (2, True), (1, False)])
def test_conv_output_is_never_an_internal_buffer(n, crop):
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 1, 3 if crop else 1, padding=0)
    ss.sparsify(conv, 0.5)
    dep = deploy(conv, plan="condensed")
    x1, x2 = torch.randn(n, 8, 6, 6), torch.randn(n, 8, 6, 6)
    with torch.no_grad():
        y1 = dep(x1)
        kept = y1.clone()
        y2 = dep(x2)
        assert torch.equal(y1, kept), "the second call overwrote the first call's output"
        assert y1.untyped_storage().data_ptr() != y2.untyped_storage().data_ptr()
        assert_close(y2, conv.eval()(x2))


def test_two_one_channel_heads_concatenated_in_one_forward():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 1, 1), nn.Conv2d(4, 1, 1)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    torch.manual_seed(3)
    model = Heads()
    ss.sparsify(model, 0.5)
    x = torch.randn(3, 4, 5, 5)
    with torch.no_grad():
        assert_close(deploy(model, plan="condensed")(x), model.eval()(x))


def test_module_registered_under_two_names_is_replaced_under_both():
    torch.manual_seed(4)
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU())
    model.add_module("again", shared)
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="condensed")
    assert isinstance(dep[0], SparseLinear) and dep.again is dep[0]
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert_close(dep(x), model.eval()(x))
        assert_close(dep.again(x), model.again(x))


def test_shared_module_used_twice_in_forward_equals_masked_model():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
            self.alias = self.block
            self.head = nn.Linear(6, 4)

        def forward(self, x):
            return self.head(self.alias(self.block(x)).mean((2, 3)))

    torch.manual_seed(5)
    model = Twice()
    ss.sparsify(model, 0.5)
    model.eval()
    model.block[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 6, 7, 7)
    dep = deploy(model, plan="condensed")
    assert dep.alias is dep.block
    with torch.no_grad():
        assert_close(dep(x), model(x))
    assert len(deployed_layers(dep)) == 2  # the shared conv once, and the head
