"""Layouts: conv N:M groups run along input channels at each kernel tap; eligibility and skip reasons."""

import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse.layout import Layout, plan
from semisparse.patterns import NM, FanIn


@pytest.mark.parametrize(
    "shape", [(8, 4, 3, 3), (16, 8, 1, 1), (4, 12, 5), (6, 4, 2, 3, 3), (5, 16, 7, 7), (3, 8)]
)
def test_conv_view_round_trips(shape):
    w = torch.randn(shape)
    mode = "rows" if len(shape) == 2 else "conv"
    lay = Layout(mode, shape)
    v = lay.to_view(w)
    assert v.shape == (shape[0], w[0].numel())
    assert torch.equal(lay.from_view(v), w)


def test_conv_view_puts_input_channels_innermost_at_each_tap():
    out, cin, kh, kw = 3, 8, 2, 3
    w = torch.arange(out * cin * kh * kw, dtype=torch.float).reshape(out, cin, kh, kw)
    v = Layout("conv", w.shape).to_view(w)
    # independent reshaping: channels-last order (out, kh, kw, cin)
    assert torch.equal(v, w.permute(0, 2, 3, 1).reshape(out, -1))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_masks_are_2_of_4_along_input_channels_per_tap(groups):
    conv = nn.Conv2d(16, 8, 3, groups=groups, padding=1)
    ss.sparsify(conv, "2:4")
    mask = ss.masks(conv)["weight"]
    # (out, cin/groups, kh, kw) -> groups of 4 consecutive input channels at each (kh, kw)
    per_tap = mask.permute(0, 2, 3, 1).reshape(8, 3, 3, -1, 4).sum(-1)
    assert bool((per_tap == 2).all())
    # the 2 kept are the largest |w| of each group of 4 input channels
    w = conv.parametrizations.weight.original.detach().abs().permute(0, 2, 3, 1).reshape(8, 3, 3, -1, 4)
    m = mask.permute(0, 2, 3, 1).reshape(8, 3, 3, -1, 4)
    assert bool((torch.where(m, w, torch.inf).amin(-1) >= torch.where(~m, w, -torch.inf).amax(-1)).all())


def test_stem_with_3_channels_is_skipped_with_reason_not_straddling_taps():
    model = nn.Sequential(nn.Conv2d(3, 16, 7), nn.Conv2d(16, 16, 3))
    cands = {c.key: c for c in plan(model, NM(2, 4))}
    assert "3 input channels per group, not a multiple of 4" in cands["0.weight"].reason
    assert cands["1.weight"].eligible


def test_depthwise_is_skipped_for_nm_but_padded_along_taps_on_request():
    dw = nn.Conv2d(8, 8, 3, groups=8)
    (c,) = plan(dw, NM(2, 4))
    assert "depthwise" in c.reason
    ss.sparsify(dw, "2:4", pad=True)
    mask = ss.masks(dw)["weight"].reshape(8, 9)
    # taps 0-3 and 4-7 keep 2 each; the lone tap 8 (padded with 3 zeros) is kept: never the padding
    assert mask[:, :4].sum(1).eq(2).all() and mask[:, 4:8].sum(1).eq(2).all() and mask[:, 8].all()
    ss.check(dw)
    x = torch.randn(2, 8, 6, 6)
    ref = nn.functional.conv2d(x, dw.parametrizations.weight.original * ss.masks(dw)["weight"], dw.bias, groups=8)
    assert torch.allclose(dw(x), ref)


def test_fan_in_pattern_takes_depthwise_and_non_divisible_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Linear(10, 5))
    assert all(c.eligible for c in plan(model, FanIn(0.5)))


def test_only_gemm_weights_are_candidates_never_norms_or_embeddings():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.GroupNorm(2, 8), nn.LayerNorm(8), nn.BatchNorm1d(8))
    assert [c.key for c in plan(model, NM(2, 4))] == ["1.weight"]


def test_include_exclude_ignore_linear_and_grouped():
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1, groups=2), nn.Flatten(), nn.Linear(8, 4))
    reasons = {c.key: c.reason for c in plan(model, NM(2, 4), exclude=["0"], ignore_linear=True, ignore_grouped=True)}
    assert reasons == {
        "0.weight": "excluded by name",
        "1.weight": "grouped conv ignored (ignore_grouped)",
        "3.weight": "Linear ignored (ignore_linear)",
    }
    reasons = {c.key: c.reason for c in plan(model, NM(2, 4), include="[13]")}
    assert reasons["0.weight"] == "not matched by include" and reasons["1.weight"] == "" and reasons["3.weight"] == ""


def test_mha_packed_qkv_is_sparsified_along_input_features():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    ss.sparsify(mha, "2:4")
    m = ss.masks(mha)
    assert set(m) == {"in_proj_weight", "out_proj.weight"}
    assert m["in_proj_weight"].shape == (48, 16)
    assert bool((m["in_proj_weight"].reshape(48, 4, 4).sum(-1) == 2).all())
    x = torch.randn(2, 5, 16)
    ref = nn.functional.multi_head_attention_forward(
        x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 16, 2,
        mha.parametrizations.in_proj_weight.original * m["in_proj_weight"], mha.in_proj_bias, None, None, False, 0.0,
        mha.out_proj.parametrizations.weight.original * m["out_proj.weight"], mha.out_proj.bias, training=False,
        need_weights=False,
    )[0].transpose(0, 1)
    mha.eval()
    assert torch.allclose(mha(x, x, x, need_weights=False)[0], ref, atol=1e-6)


def test_report_names_the_layer_class_not_parametrize_wrapper():
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    ss.sparsify(model, "2:4")
    kinds = {c.key: c.kind for c in plan(model, NM(2, 4))}
    assert kinds["0.weight"] == "Conv2d"
    assert kinds["2.weight"] == "Linear"
    assert "lazy module" in next(c.reason for c in plan(model, NM(2, 4)) if c.key == "2.weight")
