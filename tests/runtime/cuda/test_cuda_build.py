"""ss.deploy(device="cuda") on CPU: eligibility, padding, lowerings, graph wrapper, planner, saved plans.

The cuSPARSELt back-end is replaced by :class:`EmulatedBackend` (dense arithmetic that enforces cuSPARSELt's
constraints: 2:4 weights, sizes multiples of 16), CUDA graphs by :class:`EmulatedGraphs`, the clock by a
table. Tests marked ``needs_cuda`` run the real thing and skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import semisparse as ss
from semisparse.errors import SemisparseError
from semisparse.patterns import nm_mask
from semisparse.runtime.cuda import EmulatedBackend, EmulatedGraphs, GraphedModule, deploy_cuda, save_plan
from semisparse.runtime.cuda.eligibility import LayerSpec, is_24, pad_rows, sparse_reason
from semisparse.runtime.cuda.forms import (
    Conv1x1,
    ConvIm2col,
    ConvTaps,
    LinearForm,
    SparseGemm,
    im2col_weight,
    tap_weights,
)
from semisparse.runtime.cuda.layers import PlannedLayer
from semisparse.runtime.cuda.planner import planned_layers

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with cuSPARSELt")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def masked_24(out: int, k: int, dtype=torch.float32) -> torch.Tensor:
    w = torch.randn(out, k)
    return (w * nm_mask(w.abs(), 2, 4)).to(dtype)


def tiny_vit(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
                                             mlp_dim=128, num_classes=num_classes).eval()
    nn.init.normal_(m.heads.head.weight, std=0.05)  # torchvision zero-initialises the head
    return m


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.ReLU(),
                      nn.Conv2d(32, 64, 1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(64, 40)).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m


def emulated(model, dtype=torch.bfloat16, x=None, **kw):
    kw.setdefault("backend", EmulatedBackend())
    return deploy_cuda(model, dtype, example_input=x, **kw)


# --- eligibility -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,fits", [("2:4", True), ("1:4", True), ("2:8", True), ("1:8", True), ("4:8", False)])
def test_nm_masks_that_are_also_24_run_the_24_path(pattern, fits):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    ss.sparsify(lin, pattern)
    assert is_24(ss.masks(lin)["weight"]) is fits
    spec = LayerSpec("w", "Linear", torch.zeros(32, 64, dtype=torch.bfloat16), ss.masks(lin)["weight"], None, pattern)
    assert (sparse_reason(spec) == "") is fits


def test_dense_reasons_name_the_cause():
    mask = nm_mask(torch.rand(32, 64), 2, 4)
    spec = LayerSpec("w", "Linear", torch.zeros(32, 64), mask, None, "2:4")
    assert "16-bit" in sparse_reason(spec)  # fp32: no 2:4 tensor cores
    fanin = torch.zeros(32, 64, dtype=torch.bool)
    fanin[:, :6] = True  # 6 kept in the first 6 columns: 4 in the first group of 4
    spec = LayerSpec("w", "Linear", torch.zeros(32, 64, dtype=torch.bfloat16), fanin, None, "fan-in 6")
    assert "fan-in" in sparse_reason(spec) and "dense on CUDA" in sparse_reason(spec)
    mask = nm_mask(torch.rand(32, 40), 2, 4)
    spec = LayerSpec("w", "Linear", torch.zeros(32, 40, dtype=torch.float16), mask, None, "2:4")
    assert "40 input features" in sparse_reason(spec)
    spec = LayerSpec("w", "Conv2d", torch.zeros(32, 16, 3, 3, dtype=torch.float16),
                     torch.ones(32, 16, 3, 3, dtype=torch.bool), None, "2:4", {"groups": 2})
    assert "grouped" in sparse_reason(spec)


@pytest.mark.parametrize("t", [1, 15, 16, 17, 197])
def test_pad_rows_reaches_a_multiple_of_16(t):
    x = torch.randn(t, 8)
    p = pad_rows(x)
    assert p.shape[0] % 16 == 0 and p.shape[0] - t < 16
    assert torch.equal(p[:t], x) and not p[t:].any()


# --- GEMM forms: fp32 arithmetic through the emulated back-end ---------------------------------------------------

@pytest.mark.parametrize("tokens", [(1,), (7,), (2, 197), (32,)])
@pytest.mark.parametrize("out", [48, 40])  # 40: padded to 48 rows, sliced back (ViT's 1000-class head case)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_pads_tokens_and_outputs_and_equals_f_linear(tokens, out, bias):
    torch.manual_seed(0)
    w = masked_24(out, 64)
    b = torch.randn(out) if bias else None
    form = LinearForm(SparseGemm(w, b, EmulatedBackend()))  # the emulation refuses unpadded sizes
    x = torch.randn(*tokens, 64)
    y = form(x)
    assert y.shape == (*tokens, out)
    assert rel(y, F.linear(x, w, b)) < 1e-6
    assert form.gemm.alg_id == 0  # searched on the first call


def test_emulated_backend_refuses_what_cusparselt_refuses():
    be = EmulatedBackend()
    with pytest.raises(SemisparseError, match="multiples of 16"):
        be.compress(masked_24(40, 64))
    with pytest.raises(SemisparseError, match="not 2:4"):
        be.compress(torch.randn(16, 64))
    packed = be.compress(masked_24(16, 64))
    with pytest.raises(SemisparseError, match="multiple of 16"):
        be.mm(packed, torch.randn(64, 197), None)


def conv_ref(x, w, b, stride, padding, dilation):
    return F.conv2d(x, w, b, stride, padding, dilation)


@settings(max_examples=25, deadline=None)
@given(k=st.sampled_from([(1, 1), (3, 3), (1, 3), (5, 5)]), stride=st.sampled_from([1, 2]),
       padding=st.sampled_from([0, 1, 2]), dilation=st.sampled_from([1, 2]), size=st.integers(7, 12),
       bias=st.booleans(), lowering=st.sampled_from(["taps", "im2col"]))
def test_kxk_lowerings_equal_conv2d_in_fp32(k, stride, padding, dilation, size, bias, lowering):
    torch.manual_seed(0)
    cin, cout = 32, 16
    if size + 2 * padding < dilation * (k[0] - 1) + 1 or size + 2 * padding < dilation * (k[1] - 1) + 1:
        return
    w = torch.randn(cout, cin, *k)
    view = w.permute(0, 2, 3, 1).reshape(cout, -1)  # channels innermost at each tap: the layout's view
    mask = nm_mask(view.abs(), 2, 4).reshape(cout, *k, cin).permute(0, 3, 1, 2)
    w = w * mask
    b = torch.randn(cout) if bias else None
    conv = {"stride": stride, "padding": padding, "dilation": dilation}
    be = EmulatedBackend()
    if lowering == "taps":
        form = ConvTaps([SparseGemm(t, b if i == 0 else None, be) for i, t in enumerate(tap_weights(w))], k, conv)
    else:
        form = ConvIm2col(SparseGemm(im2col_weight(w), b, be), k, conv)
    x = torch.randn(2, cin, size, size + 1).contiguous(memory_format=torch.channels_last)
    y = form(x)
    ref = conv_ref(x, w, b, stride, padding, dilation)
    assert y.shape == ref.shape
    assert rel(y, ref) < 1e-5


@pytest.mark.parametrize("stride", [1, 2])
def test_1x1_conv_is_a_gemm_on_channels_last_and_stays_channels_last(stride):
    torch.manual_seed(0)
    w = masked_24(32, 64).reshape(32, 64, 1, 1)
    b = torch.randn(32)
    form = Conv1x1(SparseGemm(w.reshape(32, 64), b, EmulatedBackend()), {"stride": stride})
    x = torch.randn(3, 64, 9, 9).contiguous(memory_format=torch.channels_last)
    y = form(x)
    assert rel(y, F.conv2d(x, w, b, stride)) < 1e-6
    assert y.is_contiguous(memory_format=torch.channels_last)


# --- whole models through the deploy flow (emulated) --------------------------------------------------------------

def test_vit_mha_and_head_run_24_and_match_the_masked_model():
    vit = tiny_vit()
    ss.sparsify(vit, "2:4")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = vit(x)
    dep = emulated(vit, x=x, plan="sparse")
    dense = emulated(vit, x=x, plan="dense")
    lays = planned_layers(dep.module)
    assert {lay.kind for _, lay in lays} == {"MultiheadAttention", "Linear"}
    assert all(lay.choice == "cusparselt" for _, lay in lays)
    head = next(lay for _, lay in lays if lay.key == "heads.head.weight")
    assert "out 10 padded to 16" in head.notes[0]
    out = dep(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert rel(out, ref) < 2e-2 and rel(out, dense(x)) < 2e-2  # bf16 tolerance
    rows = {r.name: r for r in ss.report(dep).layers}
    assert rows["heads.head.weight"].extra["kernel"] == "cusparselt"


class _KdimAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, kdim=16, vdim=8, batch_first=True)

    def forward(self, q):
        k, v = q[..., :16], q[..., 16:24]
        return self.mha(q, k, v, need_weights=False)[0]


def test_mha_with_separate_qkv_projections_keeps_torchs_module_with_every_mask_applied():
    torch.manual_seed(0)
    model = _KdimAttention().eval()
    ss.sparsify(model, "2:4")
    assert {"mha.q_proj_weight", "mha.k_proj_weight", "mha.v_proj_weight"} <= set(ss.masks(model))
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        ref = model(x)
    dep = emulated(model, torch.float32, x=x, plan="sparse")
    with torch.no_grad():
        assert rel(dep(x), ref) < 1e-5  # before: q/k/v kept their dense values
    kept = dep.semisparse_plan["kept_dense"]
    assert all("separate q/k/v" in kept[k] for k in ("mha.q_proj_weight", "mha.k_proj_weight", "mha.v_proj_weight"))


def test_fp32_keeps_24_layers_dense_with_the_reason_and_exact_outputs():
    vit = tiny_vit()
    ss.sparsify(vit, "2:4")
    x = torch.randn(2, 3, 32, 32)
    dep = emulated(vit, None, x=x, plan="sparse")  # dtype=None: the model's fp32
    assert dep.semisparse_plan["dtype"] == "float32" and dep.semisparse_plan["sparse_layers"] == 0
    rows = [r for r in ss.report(dep).layers if r.sparse]
    assert rows and all(r.extra["kernel"] == "dense" and "16-bit" in r.reason for r in rows)
    with torch.no_grad():
        assert rel(dep(x), vit(x)) < 1e-5


def test_cnn_bn_folded_convs_lowered_and_equal_in_bf16():
    cnn = tiny_cnn()
    ss.sparsify(cnn, "2:4")  # the RGB stem (3 channels) stays dense
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = cnn(x)
    dep = emulated(cnn, x=x, plan="sparse")
    kinds = {lay.key: lay.choice for _, lay in planned_layers(dep.module)}
    assert kinds == {"3.weight": "cusparselt-im2col", "5.weight": "cusparselt", "9.weight": "cusparselt"}
    assert dep.semisparse_plan["folded_bn"] == 1  # the stem's BN (unmasked convs are folded too)
    assert dep.semisparse_plan["memory_format"] == "channels_last"
    assert rel(dep(x), ref) < 2e-2


def test_deploy_leaves_the_users_model_untouched():
    cnn = tiny_cnn()
    ss.sparsify(cnn, "2:4")
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    emulated(cnn, x=torch.randn(1, 3, 16, 16), plan="sparse")
    after = cnn.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ss.check(cnn)


# --- graph wrapper --------------------------------------------------------------------------------------------------

class Doubler(nn.Module):
    def forward(self, x):
        return x * 2


def test_graph_wrapper_captures_once_per_shape_and_replays():
    graphs = EmulatedGraphs()
    g = GraphedModule(Doubler(), graphs, dtype=torch.float32, max_shapes=2)
    a = g(torch.ones(2, 3))
    b = g(torch.full((2, 3), 3.0))
    assert graphs.captures == 1 and graphs.replays == 2
    assert torch.equal(a, torch.full((2, 3), 2.0))  # the first result is a copy, not the static output buffer
    assert torch.equal(b, torch.full((2, 3), 6.0))
    g(torch.ones(4, 3))
    assert graphs.captures == 2 and g.shapes == [(((2, 3), True),), (((4, 3), True),)]
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        c = g(torch.ones(5, 3))  # a third shape: beyond max_shapes, eager
    assert torch.equal(c, torch.full((5, 3), 2.0)) and graphs.captures == 2 and g.eager_calls == 1


def test_graph_wrapper_casts_inputs_to_the_model_dtype_and_format():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["dtype"], seen["cl"] = x.dtype, x.is_contiguous(memory_format=torch.channels_last)
            return x.sum()

    g = GraphedModule(Probe(), EmulatedGraphs(), dtype=torch.bfloat16, memory_format=torch.channels_last)
    g(torch.randn(1, 4, 3, 3))
    assert seen == {"dtype": torch.bfloat16, "cl": True}


def test_graph_false_runs_eagerly():
    vit = tiny_vit()
    ss.sparsify(vit, "2:4")
    x = torch.randn(1, 3, 32, 32)
    graphs = EmulatedGraphs()
    dep = emulated(vit, x=x, plan="sparse", graph=False, graphs=graphs)
    dep(x)
    dep(torch.randn(2, 3, 32, 32))
    assert graphs.captures == 0 and dep.shapes == [] and dep.semisparse_plan["graph"] is False
    dep = emulated(vit, x=x, plan="sparse", graphs=graphs)
    assert graphs.captures == 1 and len(dep.shapes) == 1  # the planned shape is captured at deploy time


# --- planner decisions under a fake timer ---------------------------------------------------------------------------

class TableTimer:
    """Layer times from ``layer[(key, form)]`` (dense forms default to ``default``); a model's time is
    ``base`` plus each layer's time in its form (sparse for the keys the planner names, else dense), plus
    ``model_extra[that set]``; the original model takes ``original``."""

    def __init__(self, layer: dict, keys: list[str], default: float = 1.0, base: float = 1.0,
                 original: float | None = None, model_extra: dict | None = None):
        self.layer, self.keys, self.default, self.base, self.original = layer, keys, default, base, original
        self.model_extra = model_extra or {}
        self.calls = []

    def __call__(self, fn, what):
        self.calls.append(what)
        if what[0] == "layer":
            return self.layer.get((what[1], what[2]), self.default)
        kind, sparse = what[1], what[2]
        if kind == "original":
            return self.original if self.original is not None else float("inf")
        t = self.base + sum(self.layer.get((k, "cusparselt" if k in sparse else "dense"), self.default)
                            for k in self.keys)
        return t + self.model_extra.get(sparse, 0.0)


KEYS = ["0.weight", "2.weight", "4.weight"]


def mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    ss.sparsify(m, "2:4")
    return m


def test_planner_keeps_sparse_only_where_faster():
    timer = TableTimer({("0.weight", "cusparselt"): 0.5, ("2.weight", "cusparselt"): 1.5,
                        ("4.weight", "cusparselt"): 1.0}, KEYS, original=100.0)
    dep = emulated(mlp(), x=torch.randn(4, 64), timer=timer)
    choice = {lay.key: lay.choice for _, lay in planned_layers(dep.module)}
    assert choice == {"0.weight": "cusparselt", "2.weight": "dense", "4.weight": "dense"}  # tie -> dense
    rows = {r.name: r for r in ss.report(dep).layers}
    assert rows["0.weight"].extra["ratio"] == 2.0 and "dense faster" in rows["2.weight"].reason
    assert dep.semisparse_plan["model"]["reverted"] == [] and not dep.semisparse_plan["model"]["fallback"]


def test_planner_reverts_layers_when_the_whole_model_is_slower():
    fast = {(f"{i}.weight", "cusparselt"): 0.5 for i in (0, 2, 4)}
    fast[("0.weight", "cusparselt")] = 0.9  # the smallest gain: reverted first
    # the three sparse layers together make the graphed model slower (e.g. extra padding copies)
    timer = TableTimer(fast, KEYS, original=100.0, model_extra={frozenset({"0.weight", "2.weight", "4.weight"}): 5.0})
    dep = emulated(mlp(), x=torch.randn(4, 64), timer=timer)
    result = dep.semisparse_plan["model"]
    assert result["reverted"] == ["0.weight"]
    choice = {lay.key: lay.choice for _, lay in planned_layers(dep.module)}
    assert choice == {"0.weight": "dense", "2.weight": "cusparselt", "4.weight": "cusparselt"}
    assert result["deployed_ms"] <= result["all_dense_ms"]


def test_planner_serves_the_original_when_nothing_deployed_is_faster():
    timer = TableTimer({(f"{i}.weight", "cusparselt"): 2.0 for i in (0, 2, 4)}, KEYS, original=0.5)
    m = mlp()
    x = torch.randn(4, 64)
    dep = emulated(m, x=x, timer=timer)
    assert dep.semisparse_plan["model"]["fallback"] is True
    assert not any(isinstance(mod, PlannedLayer) for mod in dep.module.modules())
    with torch.no_grad():
        assert rel(dep(x), m(x)) < 1e-2


# --- saved plans ----------------------------------------------------------------------------------------------------

class CountingBackend(EmulatedBackend):
    def __init__(self):
        self.compressed = 0
        self.searched = 0

    def compress(self, w):
        self.compressed += 1
        return super().compress(w)

    def search(self, packed, dense_t, bias):
        self.searched += 1
        return 3


def test_saved_plan_reloads_choices_weights_and_alg_ids_without_timing(tmp_path):
    m = mlp()
    x = torch.randn(4, 64)
    timer = TableTimer({("0.weight", "cusparselt"): 0.5, ("4.weight", "cusparselt"): 0.5}, KEYS, original=100.0)
    dep = emulated(m, x=x, timer=timer, backend=CountingBackend())
    path = tmp_path / "plan.safetensors"
    save_plan(dep, path)

    def no_timer(fn, what):
        raise AssertionError("a loaded plan must not time anything")

    be = CountingBackend()
    again = emulated(m, x=x, plan=str(path), timer=no_timer, backend=be)
    assert be.compressed == 0 and be.searched == 0  # packed weights and alg ids came from the file
    got = {lay.key: (lay.choice, lay.alg_ids()) for _, lay in planned_layers(again.module)}
    assert got == {"0.weight": ("cusparselt", {"cusparselt": [3]}), "2.weight": ("dense", {}),
                   "4.weight": ("cusparselt", {"cusparselt": [3]})}
    assert torch.equal(again(x), dep(x))
    other = mlp()
    ss.sparsify(other, "2:4", masks={k: v.roll(4, 1) for k, v in ss.masks(other).items()}, overwrite=True)
    with pytest.raises(SemisparseError, match="another mask"):
        emulated(other, x=x, plan=str(path), timer=no_timer)


# --- errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_device_cuda_without_a_gpu_is_one_clear_line():
    m = mlp()
    with pytest.raises(SemisparseError) as exc:
        ss.deploy(m, device="cuda", dtype=torch.bfloat16)
    assert "CUDA" in str(exc.value) and "\n" not in str(exc.value)


def test_bad_plan_and_dtype_are_one_line_errors():
    with pytest.raises(SemisparseError, match="saved plan file"):
        emulated(mlp(), plan="fastest")
    with pytest.raises(SemisparseError, match="dtype"):
        emulated(mlp(), torch.int8)


# --- the real thing -------------------------------------------------------------------------------------------------

@needs_cuda
def test_cusparselt_linear_matches_dense_bf16_on_gpu():
    from semisparse.runtime.cuda import require_cusparselt

    be = require_cusparselt()
    w = masked_24(1000, 768, torch.bfloat16).cuda()
    b = torch.randn(1000, dtype=torch.bfloat16, device="cuda")
    form = LinearForm(SparseGemm(w, b, be))
    x = torch.randn(197, 768, dtype=torch.bfloat16, device="cuda")
    assert rel(form(x), F.linear(x, w, b)) < 1e-2


# --- semisparse bench --device cuda ---------------------------------------------------------------------------------

def test_bench_model_row_carries_every_baseline_and_error():
    from semisparse.cli.bench_cuda import bench_model_cuda, format_rows

    table = {"deployed": 1.0, "original": 2.0, "all-dense": 1.5, "eager": 3.0}

    def timer(fn, what):
        fn()
        return table.get(what[1], 1.0) * 1e-3

    def factory():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 40)).eval()

    row = bench_model_cuda(factory, 4, torch.bfloat16, timer=timer, eager_timer=timer, backend=EmulatedBackend(),
                           graphs=EmulatedGraphs(), device="cpu", plan="sparse")
    assert row["ratio_vs_original"] == 2.0 and row["ratio_vs_all_dense"] == 1.5 and row["ratio_vs_eager"] == 3.0
    assert row["compiled_ms"] is None and row["sparse_layers"] == 2 == row["layers"]
    assert row["rel_err_vs_dense"] < 2e-2 and row["max_layer_rel_err"] < 2e-2 and len(row["layer_errors"]) == 2
    assert {r["kernel"] for r in row["per_layer"]} == {"cusparselt"}
    assert "vs original graphed" in format_rows([row])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_bench_device_cuda_without_a_gpu_is_one_line(capsys):
    from semisparse.cli import main as cli

    assert cli(["bench", "--device", "cuda", "--model", "resnet50"]) == 2
    err = capsys.readouterr().err
    assert "CUDA" in err and err.count("\n") == 1


@needs_cuda
def test_deploy_cuda_tiny_vit_graphed_matches_dense_on_gpu(tmp_path):
    vit = tiny_vit()
    ss.sparsify(vit, "2:4")
    x = torch.randn(4, 3, 32, 32)
    dep = ss.deploy(vit, device="cuda", dtype=torch.bfloat16, example_input=x)
    with torch.no_grad():
        ref = vit.cuda()(x.cuda())
    assert rel(dep(x), ref) < 2e-2 and len(dep.shapes) == 1
    save_plan(dep, tmp_path / "p.safetensors")
    again = ss.deploy(vit.cpu(), device="cuda", dtype=torch.bfloat16, example_input=x,
                      plan=str(tmp_path / "p.safetensors"))
    assert torch.equal(again(x), dep(x))


def test_a_registered_form_joins_the_planner_and_a_refusing_one_is_left_out():
    from semisparse.runtime.cuda import FORMS, register_form
    from semisparse.runtime.cuda.forms import DenseGemm

    saved = list(FORMS)

    def condensed(spec, backend):  # stands in for the Triton condensed kernel: fan-in masks only
        return LinearForm(DenseGemm(spec.weight, spec.bias)) if spec.pattern.startswith("fan-in") else None

    def refuses(spec, backend):
        raise RuntimeError("shape not supported")

    try:
        register_form("condensed", condensed, sparse=True)
        register_form("broken", refuses, sparse=True)
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
        ss.sparsify(m, 0.75)  # constant fan-in: not 2:4, no cuSPARSELt form
        timer = TableTimer({("0.weight", "condensed"): 0.25, ("2.weight", "condensed"): 2.0}, ["0.weight", "2.weight"],
                           original=100.0)
        dep = emulated(m, x=torch.randn(4, 64), timer=timer)
        lays = {lay.key: lay for _, lay in planned_layers(dep.module)}
        assert lays["0.weight"].choice == "condensed" and lays["2.weight"].choice == "dense"
        assert "cusparselt" not in lays["0.weight"].timings and "broken unavailable" in lays["0.weight"].notes[0]
    finally:
        FORMS[:] = saved


def test_report_of_a_graphed_model_names_layers_as_the_users_model_and_counts_their_macs():
    """Rows of layers the CUDA path leaves as torch modules carried the graph wrapper's ``module.`` prefix, and a
    replayed graph runs no forward hooks: the report describes the model inside, run eagerly for MACs."""
    cnn = tiny_cnn()
    ss.sparsify(cnn, "2:4")  # the RGB stem (3 channels) stays dense: a torch module in the deployed model
    x = torch.randn(2, 3, 16, 16)
    dep = emulated(cnn, x=x, plan="sparse", graph=True)
    assert isinstance(dep, GraphedModule)
    got = ss.report(dep, x)
    want = ss.report(cnn, x)
    assert {r.name for r in got.layers} == {r.name for r in want.layers}
    assert not any(r.name.startswith("module.") for r in got.layers)
    assert {r.name: r.macs for r in got.layers} == {r.name: r.macs for r in want.layers}
    assert all(r.macs > 0 for r in got.layers)


class _TwoNames(nn.Module):
    """An attention block and a Linear each registered under two names, called through both."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.again = self.attn
        self.proj = nn.Linear(32, 32)
        self.blocks = nn.ModuleList([self.proj])

    def forward(self, x):
        y = self.attn(x, x, x, need_weights=False)[0]
        y = self.again(y, y, y, need_weights=False)[0]
        return self.blocks[0](self.proj(y))


def test_a_module_under_two_names_is_swapped_under_both_on_cuda_as_on_cpu():
    from semisparse.runtime.attention import SparseMultiheadAttention

    torch.manual_seed(0)
    model = _TwoNames().eval()
    ss.sparsify(model, "2:4")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = model(x)
    for dep in (emulated(model, torch.float32, x=x, plan="sparse").module, ss.deploy(model, plan="condensed")):
        assert isinstance(dep.attn, SparseMultiheadAttention) and dep.again is dep.attn
        assert dep.blocks[0] is dep.proj and type(dep.proj) is not nn.Linear
        with torch.no_grad():
            assert rel(dep(x), ref) < 1e-5
