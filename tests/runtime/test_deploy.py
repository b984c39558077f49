"""ss.deploy: outputs equal the masked dense model's; masks (not zeros) decide; planner never slower."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy, deployed_layers, timing
from semisparse.runtime.attention import SparseMultiheadAttention
from semisparse.runtime.cpu import kernels, planner
from semisparse.runtime.cpu.layers import SparseConv, SparseLinear

RTOL = 1e-5
ROWS4 = {"block": 24, "pairs": False, "tile_kb": 0, "rows4": True}  # rows in blocks of 4 sharing their inputs


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the planner times kernels: no C compiler here")


def assert_equal_outputs(a: torch.Tensor, b: torch.Tensor) -> None:
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    assert err <= RTOL, f"max relative error {err:.2e} > {RTOL}"


def run_both(model: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    dep = deploy(model, plan=kw.pop("plan", "condensed"), **kw)
    with torch.no_grad():
        assert_equal_outputs(dep(x), model.eval()(x))
    return dep


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(1,), (5,), (70,), (2, 9)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_linear_equals_masked_dense(bias, batch_shape, sparsity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96, bias=bias), nn.ReLU(), nn.Linear(96, 17, bias=bias))
    ss.sparsify(model, sparsity)
    dep = run_both(model, torch.randn(*batch_shape, 48))
    assert all(isinstance(m, SparseLinear) for _, m in deployed_layers(dep))


CONV_CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=3, padding=1, groups=4),
    dict(kernel_size=5, padding="same", bias=False),
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=(3, 1), stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
    dict(kernel_size=7, stride=2, padding=3, bias=False),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("n", [1, 3])
def test_conv2d_equals_masked_dense(case, n):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(16, 32, **case), nn.ReLU(), nn.Conv2d(32, 8, 3, bias=False))
    ss.sparsify(model, 0.8)
    dep = run_both(model, torch.randn(n, 16, 15, 13))
    assert isinstance(dep[0], SparseConv) and dep[0].mode == ("condensed" if kernels.available() else "dense")


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_every_kernel_setting_the_planner_may_pick_is_exact(kind):
    torch.manual_seed(1)
    if kind == "conv":
        layer, x = nn.Conv2d(16, 25, 3, stride=2, padding=1), torch.randn(2, 16, 21, 19)
    else:
        layer, x = nn.Linear(40, 25), torch.randn(70, 40)
    ss.sparsify(layer, 0.9)
    dep = deploy(layer, plan="condensed")
    variants = dep.variants(x)
    assert len(variants) >= 3
    for v in variants:
        dep.use_variant(v)
        with torch.no_grad():
            assert_equal_outputs(dep(x), layer(x))


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_channel_tiled_conv_equals_masked_dense(case):
    """tile_kb=1 cuts the input channels into single-channel tiles: every tile boundary is exercised."""
    torch.manual_seed(3)
    layer = nn.Conv2d(16, 32, **case)
    ss.sparsify(layer, 0.8)
    dep = deploy(layer, plan="condensed")
    for n in (1, 2):
        x = torch.randn(n, 16, 15, 13)
        for block in (32, 64):
            dep.use_variant({"block": block, "pairs": False, "tile_kb": 1})
            with torch.no_grad():
                assert_equal_outputs(dep(x), layer(x))


@pytest.mark.parametrize("conv,shape", [(nn.Conv1d(8, 12, 3, stride=2, padding=1), (2, 8, 21)),
                                        (nn.Conv3d(8, 6, 3, padding=1, dilation=1), (1, 8, 5, 6, 7))])
def test_conv1d_and_conv3d_equal_masked_dense(conv, shape):
    torch.manual_seed(2)
    ss.sparsify(conv, 0.75)
    run_both(conv, torch.randn(*shape))


def test_unbatched_conv_input():
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    ss.sparsify(conv, 0.75)
    run_both(conv, torch.randn(8, 9, 9))


def test_depthwise_conv_with_padded_tap_masks():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 16, 1))
    ss.sparsify(model, "2:4", pad=True)
    dep = run_both(model, torch.randn(2, 8, 9, 9))
    assert isinstance(dep[0], SparseConv) and dep[0].groups == 8


def test_nm_pattern_deploys():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 36, 10))
    ss.sparsify(model, "2:4")
    dep = run_both(model, torch.randn(2, 8, 6, 6))
    assert dep[0].values.shape[1] == 8 * 9 // 2  # exactly N of every M kept, condensed to k = K/2


def test_ablated_neurons_output_their_bias_and_are_not_stored():
    torch.manual_seed(4)
    lin = nn.Linear(32, 12)
    m = torch.zeros(12, 32, dtype=torch.bool)
    m[:, :4] = True
    m[[2, 7]] = False  # ablated neurons
    ss.sparsify(lin, None, masks={"weight": m})
    dep = run_both(lin, torch.randn(3, 32))
    assert dep.orow.tolist() == [i for i in range(12) if i not in (2, 7)]
    with torch.no_grad():
        y = dep(torch.randn(1, 32))
    torch.testing.assert_close(y[0, [2, 7]], lin.bias.detach()[[2, 7]])


def test_ablated_conv_channels_and_no_bias():
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 10, 3, padding=1, bias=False)
    m = torch.rand(10, 8, 3, 3) < 0.3
    m[[0, 9]] = False
    ss.sparsify(conv, None, masks={"weight": m})
    dep = run_both(conv, torch.randn(2, 8, 7, 7))
    with torch.no_grad():
        assert bool((dep(torch.randn(1, 8, 7, 7))[:, [0, 9]] == 0).all())


def test_deploy_reads_masks_not_zeros():
    torch.manual_seed(6)
    lin = nn.Linear(16, 4)
    ss.sparsify(lin, 0.5)
    mask = ss.masks(lin)["weight"]
    with torch.no_grad():
        orig = lin.parametrizations.weight.original
        orig[mask.nonzero()[0].tolist()[0], mask.nonzero()[0].tolist()[1]] = 0.0  # a kept weight equal to 0
    dep = run_both(lin, torch.randn(2, 16))
    assert dep.values.shape == (4, 8)  # still 8 kept per neuron: the zero is a kept weight


def test_fold_drops_ablated_neurons_and_next_layer_columns():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Dropout(0.1), nn.Linear(40, 6))
    m1 = torch.rand(40, 24) < 0.3
    m1[m1.sum(1) == 0, 0] = True
    m1[[3, 11, 12, 30]] = False
    m2 = torch.rand(6, 40) < 0.5
    ss.sparsify(model, None, masks={"0.weight": m1, "3.weight": m2})
    dep = run_both(model, torch.randn(5, 24))
    assert dep[0].out_features == 36 and dep[3].in_features == 36
    assert dep[3].figures["dropped_inputs"] == 4
    unfolded = run_both(model, torch.randn(5, 24), fold=False)
    assert unfolded[0].out_features == 40


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_self_attention(batch_first, need_weights):
    torch.manual_seed(8)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    ss.sparsify(mha, 0.8)
    dep = deploy(mha, plan="condensed")
    assert isinstance(dep, SparseMultiheadAttention)
    assert isinstance(dep.in_proj, SparseLinear) and isinstance(dep.out_proj, SparseLinear)
    x = torch.randn(3, 7, 32)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, -2:] = True
    if not batch_first:
        x = x.transpose(0, 1)
    mha.eval()
    with torch.no_grad():
        want, ww = mha(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        got, gw = dep(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    assert_equal_outputs(got, want)
    if need_weights:
        assert_equal_outputs(gw, ww)


def test_multihead_attention_cross_attention_with_attn_mask():
    torch.manual_seed(9)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    ss.sparsify(mha, 0.5)
    dep = deploy(mha, plan="condensed")
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    am = torch.rand(5, 9) < 0.2
    mha.eval()
    with torch.no_grad():
        want, _ = mha(q, kv, kv, attn_mask=am, need_weights=False)
        got, _ = dep(q, kv, kv, attn_mask=am, need_weights=False)
    assert_equal_outputs(got, want)


def test_vit_block_shapes_with_mha_and_mlp():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(10)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)
    ss.sparsify(model, 0.9)
    dep = run_both(model, torch.randn(2, 3, 32, 32))
    kinds = {type(m).__name__ for _, m in dep.named_modules()}
    assert "SparseMultiheadAttention" in kinds and "MultiheadAttention" not in kinds


def test_resnet18_small_input_equals_masked_dense():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(11)
    model = torchvision.models.resnet18(num_classes=10).eval()
    ss.sparsify(model, 0.9)
    dep = run_both(model, torch.randn(1, 3, 48, 48))
    assert len(deployed_layers(dep)) == len(ss.masks(model))


def test_user_model_is_untouched():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    ss.sparsify(model, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deploy(model, plan="condensed")
    assert ss.masks(model).keys() == {"0.weight", "2.weight"}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model(torch.randn(1, 8))  # still a working parametrized model


@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(1, 40), in_f=st.integers(2, 70), s=st.floats(0.05, 0.95), batch=st.integers(1, 20),
       bias=st.booleans())
def test_property_linear_equals_masked_dense(out_f, in_f, s, batch, bias):
    torch.manual_seed(out_f * 1000 + in_f)
    lin = nn.Linear(in_f, out_f, bias=bias)
    pat = ss.parse_pattern(s)
    if pat.k(in_f) >= in_f:
        return
    ss.sparsify(lin, s)
    dep = deploy(lin, plan="condensed")
    x = torch.randn(batch, in_f)
    with torch.no_grad():
        want = F.linear(x, lin.weight, lin.bias)
        torch.testing.assert_close(dep(x), want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_report_of_deployed_model_shows_kernel_and_ratio():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 64, 10))
    ss.sparsify(model, 0.8)
    x = torch.randn(1, 4, 8, 8)
    dep = deploy(model, example_input=x, reps=3)
    rep = ss.report(dep, x)
    rows = {r.name: r for r in rep.layers}
    assert set(rows) == {"0.weight", "2.weight"}
    for r in rows.values():
        assert r.extra["kernel"] in ("dense", "dense-gemm", "condensed", "condensed-gemv", "condensed-gemv/packed",
                                     "condensed-gemv/gather") or r.extra["kernel"].startswith("condensed")
        assert r.extra["ratio"] >= 0 and r.extra["dense_us"] > 0 and r.macs > 0  # timings: noisy machine
    assert "kernel" in str(rep) and "ratio" in str(rep)
    assert {"dense_ms", "deployed_ms", "ratio"} <= set(dep.semisparse_plan)


@needs_kernels
def test_planner_reverts_to_dense_when_whole_model_is_not_faster(monkeypatch):
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    ss.sparsify(model, 0.75)
    dep = deploy(model, plan="condensed")

    def fake_times(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):  # any condensed layer makes the model slower
        out = []
        for fn in fns:
            fn()
            out.append(1.0 + sum(m.mode == "condensed" for _, m in deployed_layers(dep)))
        return out

    monkeypatch.setattr(planner, "interleaved_medians", fake_times)
    for _, m in deployed_layers(dep):
        m.figures = {"ratio": 2.0}
    out = planner.plan_model(dep, torch.randn(1, 16))
    assert all(m.mode == "dense" for _, m in deployed_layers(dep))
    assert out["deployed_ms"] <= out["dense_ms"] and len(out["reverted"]) == 3
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert_equal_outputs(dep(x), model.eval()(x))


@needs_kernels
def test_planner_keeps_dense_where_kernel_loses(monkeypatch):
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    ss.sparsify(model, 0.75)
    dep = deploy(model, plan="condensed")
    calls = []

    # first layer (16 outputs): kernel loses; second: wins
    def fake_times(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):
        calls.append(len(fns))
        return [1.0] + [2.0 if fns[0]().shape[-1] == 16 else 0.5] * (len(fns) - 1)

    monkeypatch.setattr(planner, "interleaved_medians", fake_times)
    planner.plan_layers(dep, torch.randn(1, 16))
    assert dep[0].mode == "dense" and dep[2].mode == "condensed"
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert_equal_outputs(dep(x), model.eval()(x))


def test_bad_input_is_a_one_line_error():
    with pytest.raises(ss.SemisparseError, match="no semisparse masks"):
        deploy(nn.Linear(4, 4))
    lin = nn.Linear(8, 4)
    ss.sparsify(lin, 0.5)
    with pytest.raises(ss.SemisparseError, match="device"):
        deploy(lin, device="cuda")
    with pytest.raises(ss.SemisparseError, match="plan"):
        deploy(lin, plan="fast")
    with pytest.raises(ss.SemisparseError, match="batch_size"):
        deploy(lin, batch_size=0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))  # needs 8x8 inputs
    ss.sparsify(cnn, 0.5)
    with pytest.raises(ss.SemisparseError, match="example_input"):
        deploy(cnn)
    deploy(cnn, example_input=torch.randn(1, 3, 8, 8), reps=2)


def test_fp16_request_runs_dense_with_warning():
    lin = nn.Linear(8, 4)
    ss.sparsify(lin, 0.5)
    with pytest.warns(RuntimeWarning, match="float16"):
        dep = deploy(lin, dtype=torch.float16)
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(dep(x.half()).float(), lin(x), rtol=2e-2, atol=2e-2)


def test_bf16_request_without_kernels_runs_dense_with_warning(monkeypatch):
    monkeypatch.setattr(kernels.build, "library", lambda: None)
    lin = nn.Linear(8, 4)
    ss.sparsify(lin, 0.5)
    with pytest.warns(RuntimeWarning, match="bfloat16"):
        dep = deploy(lin, dtype=torch.bfloat16)
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(dep(x.bfloat16()).float(), lin(x), rtol=2e-2, atol=2e-2)


def test_batch1_fast_path_equals_masked_dense_and_follows_variant_changes():

    if not kernels.available():
        pytest.skip("no C kernels on this machine")
    torch.manual_seed(3)
    lin = nn.Linear(96, 40)
    ss.sparsify(lin, 0.8)
    x = torch.randn(1, 96)
    ref = lin(x).detach()
    dep = ss.deploy(copy.deepcopy(lin), plan="condensed")
    for variant in kernels.GEMV_VARIANTS:
        dep.use_variant({"gemv_variant": variant})
        with torch.inference_mode():
            out = dep(x)
        bound = dep.__dict__["_bound_gemv"]  # the bound batch-1 kernel ran, with this variant
        assert bound is not None and bound.__defaults__[0].hw == int(variant != "packed")
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_bound_batch1_call_is_never_shared_or_stale():
    """The bound call holds raw pointers: copies rebind, mode changes and new weights are honoured."""
    import pickle

    torch.manual_seed(4)
    lin = nn.Linear(64, 24)
    ss.sparsify(lin, 0.75)
    x = torch.randn(1, 64)
    dep = ss.deploy(copy.deepcopy(lin), plan="condensed")
    with torch.no_grad():
        ref = lin(x)
        assert_equal_outputs(dep(x), ref)
        twin = copy.deepcopy(dep)
        clone = pickle.loads(pickle.dumps(dep))
        del dep
        import gc

        gc.collect()
        assert twin.__dict__.get("_bound_gemv") is None
        assert_equal_outputs(twin(x), ref)
        assert_equal_outputs(clone(x), ref)
        twin.set_mode("dense")
        assert twin.__dict__.get("_bound_gemv") is None
        assert_equal_outputs(twin(x), ref)
        twin.set_mode("condensed")
        twin(x)
        sd = {k: v * 2 if k in ("values", "bias") else v for k, v in twin.state_dict().items()}
        twin.load_state_dict(sd)
        assert_equal_outputs(twin(x), 2 * ref)


@pytest.mark.parametrize("kind", ["linear", "conv", "linear-rows4", "conv-rows4"])
def test_new_weights_reach_every_cached_kernel_form(kind):
    """Tiles and the rows4 order hold copies of the values: loading new weights must rebuild them."""
    torch.manual_seed(5)
    if kind.startswith("linear"):
        layer, xs = nn.Linear(64, 24), [torch.randn(1, 64), torch.randn(40, 64)]
        variant = {"panel_width": 32, "pairs": True}
    else:
        layer, xs = nn.Conv2d(16, 12, 3, padding=1), [torch.randn(1, 16, 9, 9), torch.randn(2, 16, 9, 9)]
        variant = {"block": 32, "pairs": False, "tile_kb": 1}
    if kind.endswith("rows4"):
        ss.sparsify(layer, "2:4", shared_rows=4)
        variant = ({"panel_width": 24, "pairs": False, "transposed_out": True, "rows4": True}
                   if kind.startswith("linear") else ROWS4)
    else:
        ss.sparsify(layer, 0.75)
    dep = ss.deploy(copy.deepcopy(layer), plan="condensed")
    dep.use_variant(variant)
    with torch.no_grad():
        refs = [layer(x) for x in xs]
        for x, ref in zip(xs, refs):
            assert_equal_outputs(dep(x), ref)
        dep.load_state_dict({k: v * 2 if k in ("values", "bias") else v for k, v in dep.state_dict().items()})
        for x, ref in zip(xs, refs):
            assert_equal_outputs(dep(x), 2 * ref)


@settings(max_examples=30, deadline=None)
@given(cin=st.integers(1, 12), cout=st.integers(1, 12), k=st.integers(1, 4), stride=st.integers(1, 3),
       dil=st.integers(1, 2), pad=st.integers(0, 2), groups=st.sampled_from([1, 2]), h=st.integers(3, 11),
       w=st.integers(3, 11), n=st.sampled_from([1, 2]), setting=st.integers(0, 5), ablate=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_any_conv2d_geometry_and_setting_equals_masked_dense(cin, cout, k, stride, dil, pad, groups, h, w, n, setting,
                                                              ablate, bias, seed):
    """The one-call batch-1 path (and the batched path) against F.conv2d over random geometries, with every
    kernel setting the planner may pick, ablated output channels and no bias."""
    cin, cout = cin * groups, cout * groups
    if (h + 2 * pad - dil * (k - 1) - 1) < 0 or (w + 2 * pad - dil * (k - 1) - 1) < 0:
        return  # no output position
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias)
    mask = torch.rand(conv.weight.shape) < 0.5
    if ablate and cout > 1:
        mask[torch.randperm(cout)[: cout // 2]] = False
    ss.sparsify(conv, None, masks={"weight": mask})
    dep = deploy(conv, plan="condensed")
    x = torch.randn(n, cin, h, w)
    settings = dep.variants(x)  # the strategy's range covers the six settings of rows that differ
    assert len(settings) == 6 or (len(settings) == 7 and settings[-1] == ROWS4)
    dep.use_variant(dep.variants(x)[setting])
    with torch.no_grad():
        assert_equal_outputs(dep(x), conv(x))
        assert_equal_outputs(dep(x), conv(x))  # second call: the bound plan


def test_kernel_settings_have_readable_names():
    assert planner.setting_name({"block": 32, "pairs": True, "tile_kb": 0}) == "32,pairs"
    assert planner.setting_name({"block": 64, "pairs": False, "tile_kb": 32}) == "64,tiles32K"
    assert planner.setting_name({"panel_width": 32, "pairs": False, "transposed_out": True}) == "32,transposed"
    assert planner.setting_name({"gemv_variant": "packed"}) == "packed"
    assert planner.setting_name(ROWS4) == "24,rows4"
    assert planner.setting_name({"block": 64, "pairs": False, "tile_kb": 0, "rows4": False}) == "64"


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own reference conv
@pytest.mark.parametrize("k,dil", [(2, 1), (4, 1), (2, 3), (4, 2)])
@pytest.mark.parametrize("n", [1, 2])
def test_same_padding_with_even_kernels_pads_more_on_the_far_side(k, dil, n):
    torch.manual_seed(k * 10 + dil)
    conv = nn.Conv2d(6, 5, k, padding="same", dilation=dil)
    ss.sparsify(conv, 0.6)
    dep = deploy(conv, plan="condensed")
    x = torch.randn(n, 6, 9, 8)
    for v in dep.variants(x):
        dep.use_variant(v)
        with torch.no_grad():
            assert_equal_outputs(dep(x), conv(x))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n", [1, 3])
def test_dense_mode_1x1_conv_as_one_matrix_product_equals_torch(bias, n):
    torch.manual_seed(21)
    model = nn.Sequential(nn.Conv2d(12, 20, 1, bias=bias))
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="dense")
    layer = dep[0]
    assert layer.dense_variants(torch.randn(n, 12, 5, 7)) == [{"dense_gemm": False}, {"dense_gemm": True}]
    layer.use_variant({"dense_gemm": True})
    assert layer.kernel_name() == "dense-gemm"
    x = torch.randn(n, 12, 5, 7)
    with torch.no_grad():
        assert_equal_outputs(dep(x), model.eval()(x))
        assert_equal_outputs(dep(x[0]), model(x[0]))  # unbatched input: torch's conv


@pytest.mark.parametrize("conv", [nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 1, groups=2),
                                  nn.Conv2d(8, 8, 1, padding=1)])
def test_only_plain_1x1_convs_are_offered_as_a_matrix_product(conv):
    model = nn.Sequential(conv)
    ss.sparsify(model, 0.5)
    layer = deploy(model, plan="dense")[0]
    assert layer.dense_variants(torch.randn(1, 8, 6, 6)) == [{"dense_gemm": False}]


@needs_kernels
def test_planner_picks_the_fastest_dense_form_and_reports_against_torch(monkeypatch):
    torch.manual_seed(22)
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="condensed")

    def fake_times(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):  # torch's conv 3, matrix product 1, kernels 2
        out = []
        for fn in fns:
            layer = {16: dep[0], 4: dep[2]}[fn().shape[1]]  # the candidate left its form on its layer
            out.append(2.0 if layer.mode == "condensed" else 1.0 if layer.dense_gemm else 3.0)
        return out

    monkeypatch.setattr(planner, "interleaved_medians", fake_times)
    planner.plan_layers(dep, torch.randn(1, 8, 6, 6))
    for layer in (dep[0], dep[2]):
        assert layer.mode == "dense" and layer.dense_gemm and layer.kernel_name() == "dense-gemm"
        assert layer.figures["dense_us"] == 3e6 and layer.figures["dense_best_us"] == 1e6
        assert layer.figures["sparse_us"] == 2e6 and layer.figures["ratio"] == 1.5
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert_equal_outputs(dep(x), model.eval()(x))


@needs_kernels
def test_whole_model_check_hands_everything_back_to_torch_when_never_faster(monkeypatch):
    from semisparse.runtime.cpu.pool import MaxPool2d

    torch.manual_seed(23)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3))
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="condensed")
    dep[2].figures = {"ratio": 2.0}
    dep[0].set_mode("dense")
    dep[0].dense_gemm = True

    def fake_times(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):  # the deployed side is always the slower
        for fn in fns:
            fn()
        return [1.0, 2.0]

    monkeypatch.setattr(planner, "interleaved_medians", fake_times)
    planner.plan_model(dep, torch.randn(1, 3, 8, 8))
    assert dep[0].mode == dep[2].mode == "dense" and not dep[0].dense_gemm
    assert isinstance(dep[1], MaxPool2d) and not dep[1].use_kernel
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_equal_outputs(dep(x), model.eval()(x))


@pytest.mark.parametrize("start", ["dense", "condensed"])
def test_dense_weight_of_a_1x1_conv_is_row_major_not_channels_last(start):
    # torch reads strides (C, 1, C, C) of a (O, C, 1, 1) weight as channels-last and runs a slower conv
    model = nn.Sequential(nn.Conv2d(16, 32, 1))
    ss.sparsify(model, 0.5)
    layer = deploy(model, plan=start)[0]
    layer.set_mode("condensed")
    layer.drop_unused()
    layer.set_mode("dense")
    for w in (layer.dense_weight, deploy(model, plan="dense")[0].dense_weight):
        assert w.stride() == (16, 1, 1, 1)


def test_interleaved_timing_varies_who_runs_after_whom_and_keeps_results_in_place(monkeypatch):
    calls = []
    ticks = iter(range(10**6))
    clock = lambda: float(next(ticks))  # noqa: E731

    def make(i):
        def fn():  # candidate i lasts 1 + i ticks of the fake clock
            calls.append(i)
            for _ in range(i):
                clock()
        return fn

    fns = [make(i) for i in range(4)]
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    out = timing.interleaved_medians(fns, reps=30, warmup=1, budget_s=1e9)
    assert out == [1.0, 2.0, 3.0, 4.0]  # each candidate's median in its own slot, whatever the order
    timed = calls[4:]
    assert sorted(timed) == sorted(list(range(4)) * 30)
    after_first = {timed[j + 1] for j in range(len(timed) - 1) if timed[j] == 0 and (j + 1) % 4}
    assert len(after_first) >= 2  # candidate 0 is not always followed by the same candidate
    calls.clear()
    timing.interleaved_medians(fns, reps=3, warmup=0, budget_s=1e9, shuffle=False)
    assert calls == [0, 1, 2, 3] * 3


def test_deployed_copy_requires_no_grad_and_leaves_the_model_as_it_was():
    """The layers deploy keeps as torch modules (a dense conv, the classifier) kept ``requires_grad=True``, so a
    call outside ``no_grad`` built an autograd graph behind the output. The copy is for inference, as on CUDA."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 4))
    ss.sparsify(model, 0.5, include=["4"])
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    dep = ss.deploy(model, batch_size=2, example_input=torch.randn(2, 3, 6, 6), reps=1)
    assert [n for n, p in dep.named_parameters() if p.requires_grad] == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before and all(before.values())
    y = dep(torch.randn(2, 3, 6, 6))
    assert y.grad_fn is None and not y.requires_grad
    x = torch.randn(2, 3, 6, 6, requires_grad=True)  # an input that wants its gradient still gets it
    dep(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _first_is_fastest(fns, reps=20, warmup=2, budget_s=1.0, min_reps=5):
    """A planner timer by which the first candidate always wins: torch's dense layer and torch's pooling."""
    for fn in fns:
        fn()
    return [1.0 + i for i in range(len(fns))]


def test_layers_the_planner_keeps_dense_are_torchs_own_modules_and_cost_what_they_cost(monkeypatch):
    """A deployed layer in dense mode ran its wrapper's Python and the model's thread hooks on every call: the
    digits CNN deployed all-dense was 7% slower than the dense model. Now a layer kept dense is torch's module
    (a subclass that only carries the report row), pooling left to torch is nn.MaxPool2d, and a model that runs
    no semisparse code keeps only the thread hooks: what the original costs on the CPUs it has, with the planner's
    figures still in the report."""
    from semisparse.runtime.cpu.kept import KeptDenseConv2d, KeptDenseLinear
    from semisparse.runtime.cpu.pool import MaxPool2d

    torch.manual_seed(31)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    ss.sparsify(model, 0.5)
    x = torch.randn(2, 3, 8, 8)
    monkeypatch.setattr(planner, "interleaved_medians", _first_is_fastest)
    dep = deploy(model, batch_size=2, example_input=x, reps=2)
    assert type(dep[0]) is KeptDenseConv2d and type(dep[4]) is KeptDenseLinear and type(dep[6]) is KeptDenseLinear
    assert type(dep[2]) is nn.MaxPool2d and not isinstance(dep[2], MaxPool2d)
    assert deployed_layers(dep) == []
    # the thread hooks stay: a layer kept dense is sized to the free CPUs like a condensed one
    assert dep._forward_pre_hooks and dep._forward_hooks
    assert dep.semisparse_plan["torch_layers"] == 3 and dep.semisparse_plan["thread_hooks"] is True
    assert not any(p.requires_grad for p in dep.parameters())
    with torch.no_grad():
        assert_equal_outputs(dep(x), model(x))
    rows = {r.name: r for r in ss.report(dep, x).layers}
    assert set(rows) == {"0.weight", "4.weight", "6.weight"}
    for r in rows.values():
        assert r.extra["kernel"] == "dense" and r.extra["ratio"] > 0 and r.macs > 0
        assert r.sparse and r.density == pytest.approx(0.5, abs=0.05)


def test_kept_dense_swap_leaves_condensed_layers_and_the_hooks(monkeypatch):
    from semisparse.runtime.cpu.build import _kept_dense_to_torch, _runs_semisparse
    from semisparse.runtime.cpu.kept import KeptDenseLinear

    torch.manual_seed(32)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    ss.sparsify(model, 0.75)
    dep = deploy(model, plan="condensed")
    dep[0].set_mode("dense")
    shared = nn.Sequential(dep, dep)  # one layer under two names is replaced under both
    out, n = _kept_dense_to_torch(shared)
    assert n == 1 and type(out[0][0]) is KeptDenseLinear and out[0][0] is out[1][0]
    assert isinstance(out[0][2], SparseLinear) and out[0][2].mode == "condensed" and _runs_semisparse(out)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert_equal_outputs(out[0](x), model(x))


# ---------------------------------------------------------------------------------------------------------
# rows in blocks of 4 that keep the same inputs (sparsify(shared_rows=4)): the rows4 kernel setting


def _shared_conv(cin, cout, k, seed=0, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, **kw)
    ss.sparsify(conv, "2:4", shared_rows=4)
    return conv



@needs_kernels
def test_rows4_is_offered_for_rows_that_share_their_inputs_at_any_batch():
    shared = deploy(_shared_conv(16, 24, 3, padding=1), plan="condensed")
    x = torch.randn(1, 16, 9, 9)
    assert shared.variants(x)[-1] == ROWS4 and len(shared.variants(x)) == 7
    assert shared.variants(torch.randn(2, 16, 9, 9))[-1] == ROWS4  # the batched path runs it too
    torch.manual_seed(0)
    per_row = nn.Conv2d(16, 24, 3, padding=1)
    ss.sparsify(per_row, "2:4")
    assert not any(v["rows4"] for v in deploy(per_row, plan="condensed").variants(x))
    grouped = nn.Conv2d(16, 8, 1, groups=2)  # 4 rows per group: each block reads one group's inputs
    ss.sparsify(grouped, "2:4", shared_rows=4)
    assert any(v["rows4"] for v in deploy(grouped, plan="condensed").variants(torch.randn(1, 16, 5, 5)))
    crossing = nn.Conv2d(16, 4, 1, groups=2)  # a block of 4 rows spans both groups: other inputs, no rows4
    ss.sparsify(crossing, "2:4", shared_rows=4)
    assert not any(v["rows4"] for v in deploy(crossing, plan="condensed").variants(torch.randn(1, 16, 5, 5)))


@settings(max_examples=30, deadline=None)
@given(cin=st.sampled_from([4, 8, 12]), blocks=st.integers(1, 5), k=st.integers(1, 3), stride=st.integers(1, 2),
       pad=st.integers(0, 1), dil=st.integers(1, 2), h=st.integers(3, 30), w=st.integers(3, 13),
       ablate=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_rows4_conv_equals_masked_dense_for_any_geometry(cin, blocks, k, stride, pad, dil, h, w, ablate, bias, seed):
    """Any number of positions (partial last tiles of 24), strides, dilations, whole blocks ablated, no bias:
    the rows4 setting computes the masked dense conv, and writes nothing past a row's positions."""
    if (h + 2 * pad - dil * (k - 1) - 1) < 0 or (w + 2 * pad - dil * (k - 1) - 1) < 0:
        return
    conv = _shared_conv(cin, 4 * blocks, k, seed=seed, stride=stride, padding=pad, dilation=dil, bias=bias)
    if ablate and blocks > 1:  # a whole block of 4 output channels ablated: the rest still in blocks
        with torch.no_grad():
            mask = ss.masks(conv)["weight"]
            mask[:4] = False
        ss.sparsify(conv, None, masks={"weight": mask}, overwrite=True)
    dep = deploy(conv, plan="condensed")
    x = torch.randn(1, cin, h, w)
    assert dep.variants(x)[-1]["rows4"]
    dep.use_variant(dep.variants(x)[-1])
    with torch.no_grad():
        assert_equal_outputs(dep(x), conv(x))
        assert_equal_outputs(dep(x), conv(x))  # the bound call
        assert dep.__dict__["_fast_conv"] is not None
        x2 = torch.randn(2, cin, h, w)  # a batch after planning at 1: the bound batch-1 call, sample by sample
        assert_equal_outputs(dep(x2), conv(x2))
        assert dep.__dict__["_fast_conv"][0] == (1, cin, h, w)


@needs_kernels
def test_rows4_binding_refuses_rows_that_do_not_share_their_offsets():
    dep = deploy(_shared_conv(8, 8, 1), plan="condensed")
    x = torch.randn(1, 8, 6, 6)
    dep.use_variant(ROWS4)
    with torch.no_grad():
        dep(x)
    run_args = dep.__dict__["_fast_conv"]
    assert run_args is not None
    g = dep._plan_geometry(1, (6, 6))
    off = g["off"].tensor().clone()
    off[1, 0] += 1  # row 1 of block 0 now reads another input than row 0
    geo = dict(C=8, H0=6, W0=6, sh=1, sw=1, H=6, W=6, pt=0, pl=0, Hp=6, Wp=6, cs=g["c_stride"], stH=1, stW=1,
               Hq=6, Wq=6, P=g["P"], Ho=6, Wo=6)
    tables = dep._tables()
    with pytest.raises(ValueError, match="rows4 needs rows in blocks of 4 with the same offsets"):
        kernels.conv2d_binding(geo, dep._rows4_values(), off, None, dep.bias_rows(), tables["orow"],
                               tables["ablated"], torch.zeros(0), 24, 3, 8)


@needs_kernels
def test_rows4_conv_reads_each_blocks_inputs_in_memory_order():
    """A 3x3 conv's kept inputs come tap by tap; the bound rows4 call takes them sorted by offset (neighbouring
    taps share cache lines), each block's weights moved with their inputs: the same conv, in another order."""
    conv = _shared_conv(16, 16, 3, padding=1)
    dep = deploy(conv, plan="condensed")
    x = torch.randn(1, 16, 9, 9)
    dep.use_variant(ROWS4)
    with torch.no_grad():
        assert_equal_outputs(dep(x), conv(x))
    g = dep._plan_geometry(1, (9, 9))
    W, off = dep.__dict__["_fast_conv"][4][:2]
    assert off is g["rows4"][1] and not torch.equal(off.tensor(), g["off"].tensor())
    off = off.tensor()
    assert bool((off[:, 1:] > off[:, :-1]).all())
    view = g["off"].tensor()
    w4 = dep._rows4_values()
    for b in range(4):  # every (offset, 4 weights) pair of the block is one of the view order's pairs
        before = {(int(o), tuple(w4[4 * b:4 * b + 4].view(-1, 4)[j].tolist())) for j, o in enumerate(view[4 * b])}
        after = {(int(o), tuple(W[4 * b:4 * b + 4].view(-1, 4)[j].tolist())) for j, o in enumerate(off[4 * b])}
        assert before == after


@needs_kernels
@pytest.mark.parametrize("k, pad, h, w, in_place", [
    (1, 0, 8, 8, True), (1, 0, 4, 4, True), (1, 0, 12, 2, False),  # 24 positions: cs (32) != H*W
    (1, 0, 7, 7, False),  # 49 positions: the last vector would read 7 floats past x
    (1, 1, 8, 8, False), (3, 0, 8, 8, False), (3, 1, 8, 8, False)])
def test_rows4_1x1_conv_reads_its_input_in_place_only_where_every_read_lies_inside_it(k, pad, h, w, in_place):
    """An unpadded 1x1 conv of stride 1 whose planes are whole vectors reads x itself instead of a copy of it;
    any padding, tap shift or read past the last plane takes the copy."""
    conv = _shared_conv(32, 16, k, padding=pad)
    dep = deploy(conv, plan="condensed")
    x = torch.randn(1, 32, h, w)
    x0 = x.clone()
    dep.use_variant(ROWS4)
    with torch.no_grad():
        assert_equal_outputs(dep(x), conv(x))
        assert_equal_outputs(dep(x), conv(x))
    assert torch.equal(x, x0)
    g = dep._plan_geometry(1, (h, w))
    geo = dict(C=32, H0=h, W0=w, sh=1, sw=1, H=h, W=w, pt=pad, pl=pad, Hp=g["padded"][0], Wp=g["padded"][1],
               cs=g["c_stride"], stH=1, stW=1, Hq=g["planes"][0], Wq=g["planes"][1], P=g["P"], Ho=g["outs"][0],
               Wo=g["outs"][1])
    assert kernels.reads_input_as_is(geo, g["rows4"][1], 3, 24) is in_place
    # the other kernels read whole blocks of PB positions: in place only where P is a multiple of PB
    assert kernels.reads_input_as_is(geo, g["off"], 0, 64) is (in_place and g["P"] % 64 == 0)
    assert kernels.reads_input_as_is(geo, g["off"], 0, 16) is (in_place and g["P"] % 16 == 0)


@needs_kernels
@pytest.mark.parametrize("setting", [ROWS4, {"block": 64, "pairs": False, "tile_kb": 0, "rows4": False},
                                     {"block": 32, "pairs": False, "tile_kb": 16, "rows4": False}])
def test_a_batched_conv_runs_the_bound_batch_1_call_sample_by_sample(setting):
    """Batch 3 (never called at batch 1 before) runs one bound batch-1 call per sample: no (C, N, H, W) copy of
    the input, no transpose of the output (1.0-4.0x at batch 32); another input size binds again."""
    conv = _shared_conv(16, 24, 3, padding=1, stride=2)
    dep = deploy(conv, plan="condensed")
    dep.use_variant(setting)
    with torch.no_grad():
        for h, w in ((11, 9), (6, 13)):
            x = torch.randn(3, 16, h, w)
            assert_equal_outputs(dep(x), conv(x))
            assert dep.__dict__["_fast_conv"][0] == (1, 16, h, w)
            assert_equal_outputs(dep(x[1:2]), conv(x[1:2]))


@needs_kernels
def test_a_batched_conv_sees_values_replaced_between_calls():
    """The batch-1 call bound for sample-by-sample batches is not reused once the values were replaced (``.data =``),
    and runs under inference_mode."""
    conv = _shared_conv(16, 24, 3, padding=1)
    dep = deploy(conv, plan="condensed")
    dep.use_variant(ROWS4)
    x = torch.randn(3, 16, 9, 9)
    with torch.no_grad():
        dep(x)
        dep.values.data = dep.values.data * 2
        bias = conv.bias[None, :, None, None]
        assert_equal_outputs(dep(x), 2 * (conv(x) - bias) + bias)
    with torch.inference_mode():
        assert_equal_outputs(dep(x), 2 * (conv(x) - bias) + bias)


def test_rows4_linear_whose_blocks_are_not_adjacent_outputs_takes_the_transposed_path():
    """Blocks of 4 stored rows with the same inputs but output rows apart (ablated neurons in between): rows4
    still runs, writing (out, B) and transposing, since a block's 4 outputs of a token are not adjacent."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    mask = torch.zeros(12, 16, dtype=torch.bool)
    mask[:, ::2] = True  # every row keeps the same 8 inputs (2:4)
    mask[[1, 6, 10, 11]] = False  # stored rows 0, 2, 3, 4 | 5, 7, 8, 9
    ss.sparsify(lin, None, masks={"weight": mask})
    dep = deploy(lin, plan="condensed")
    x = torch.randn(30, 16)
    setting = dep.variants(x)[-1]
    assert setting["rows4"] and not dep._tables()["orow"].adjacent_in_fours()
    dep.use_variant(setting)
    with torch.no_grad():
        assert_equal_outputs(dep(x), lin(x))


@pytest.mark.parametrize("batch", [24, 25, 50, 197])
@pytest.mark.parametrize("ablate", [False, True])
def test_rows4_linear_equals_masked_dense(batch, ablate):
    """Panels of 24 tokens, a partial last panel, a whole block of 4 neurons ablated; smaller batches run
    the other kernels under the same setting."""
    torch.manual_seed(batch)
    lin = nn.Linear(64, 40)
    ss.sparsify(lin, "2:4", shared_rows=4)
    if ablate:
        mask = ss.masks(lin)["weight"]
        mask[8:12] = False
        ss.sparsify(lin, None, masks={"weight": mask}, overwrite=True)
    dep = deploy(lin, plan="condensed")
    x = torch.randn(batch, 64)
    settings = dep.variants(x)
    assert settings[-1] == {"panel_width": 24, "pairs": False, "transposed_out": True, "rows4": True}
    assert not any(v.get("rows4") for v in dep.variants(torch.randn(23, 64)))
    dep.use_variant(settings[-1])
    with torch.no_grad():
        assert_equal_outputs(dep(x), lin(x))
        x_small = torch.randn(7, 64)
        assert_equal_outputs(dep(x_small), lin(x_small))
    torch.manual_seed(0)
    per_row = nn.Linear(64, 40)
    ss.sparsify(per_row, "2:4")
    assert not any(v.get("rows4") for v in deploy(per_row, plan="condensed").variants(x))
