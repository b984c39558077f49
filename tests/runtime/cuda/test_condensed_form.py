"""ss.deploy(device="cuda") with constant fan-in layers on the condensed Triton kernels, on CPU.

The kernels run under the Triton interpreter (tests/conftest.py switches it on without CUDA), cuSPARSELt
is emulated and CUDA graphs too, the clock is a table: the deploy flow of a GPU, with CPU mechanisms.
Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semisparse as ss
from semisparse.patterns import nm_mask
from semisparse.runtime.cuda import EmulatedBackend, EmulatedGraphs, deploy_cuda, save_plan
from semisparse.runtime.cuda import kernels as tc
from semisparse.runtime.cuda.condensed_form import NAME, CondensedForm, condensed_reason
from semisparse.runtime.cuda.eligibility import LayerSpec
from semisparse.runtime.cuda.layers import PlannedLayer
from semisparse.runtime.cuda.planner import planned_layers

#: The deploy flow on CPU tensors: the kernels run only under Triton's interpreter (tests/conftest.py turns it
#: on where there is no CUDA; on a GPU machine these skip and the CUDA test at the end runs instead).
on_cpu = pytest.mark.skipif(not tc.interpreting(), reason="runs the kernels on CPU under TRITON_INTERPRET=1")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def fanin_mask(shape: tuple, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = shape[0]
    width = int(torch.tensor(shape[1:]).prod())
    cols = torch.rand(rows, width, generator=g).argsort(1)[:, :k]
    return torch.zeros(rows, width, dtype=torch.bool).scatter_(1, cols, True).reshape(shape)


def spec(kind: str, shape: tuple, pattern: str = "fan-in 8", dtype=torch.float32, conv=None) -> LayerSpec:
    mask = fanin_mask(shape, 8) if not pattern.startswith("2:") else nm_mask(torch.rand(shape), 2, 4)
    w = torch.randn(shape) * mask
    return LayerSpec("w", kind, w.to(dtype), mask, torch.randn(shape[0]).to(dtype), pattern, conv or {})


class Tiny(nn.Module):
    """1x1 convs (stride 1 and 2, channels-last), an MHA, an MLP (a Sequential: its ablated neurons fold)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 1)
        self.down = nn.Conv2d(32, 32, 1, stride=2)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(F.relu(self.conv(x)))
        t = y.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t + self.mlp(t)
        return self.head(t.mean(1))


def tiny(ablate: bool = True) -> nn.Module:
    torch.manual_seed(0)
    m = Tiny().eval()
    ss.sparsify(m, 0.75)
    if ablate:  # SRigL's ablated neurons: rows that keep nothing
        masks = ss.masks(m)
        masks["mlp.0.weight"][[3, 17]] = False  # folded away (Linear -> GELU -> Linear)
        masks["conv.weight"][5] = False  # not foldable: its output is its bias
        ss.sparsify(m, None, masks=masks, overwrite=True)
    return m


def deploy(model, x, **kw):
    kw.setdefault("backend", EmulatedBackend())
    kw.setdefault("graphs", EmulatedGraphs())
    return deploy_cuda(model, kw.pop("dtype", None), example_input=x, device="cpu", **kw)


# --- eligibility -------------------------------------------------------------------------------------------------

@on_cpu
def test_constant_fan_in_layers_get_the_condensed_form_in_fp32_and_16_bit():
    for dtype in (torch.float32, torch.bfloat16):
        for s in (spec("Linear", (24, 40), dtype=dtype), spec("MultiheadAttention", (48, 16), dtype=dtype),
                  spec("Conv2d", (32, 16, 1, 1), dtype=dtype, conv={"stride": 2, "groups": 1, "padding": 0})):
            layer = PlannedLayer(s, EmulatedBackend())
            assert NAME in layer.forms and layer.sparse_forms == [NAME] and layer.reason == "", (dtype, s.kind)


@on_cpu
def test_condensed_form_refuses_kxk_grouped_and_leaves_nm_to_the_24_path():
    s = spec("Conv2d", (16, 16, 3, 3), conv={"padding": 1, "groups": 1})
    assert "1x1" in condensed_reason(s)
    layer = PlannedLayer(s, EmulatedBackend())
    assert NAME not in layer.forms and "1x1" in layer.reason and "not 2:4" in layer.reason
    assert "grouped" in condensed_reason(spec("Conv2d", (16, 16, 1, 1), conv={"groups": 2}))
    nm = spec("Linear", (16, 32), pattern="2:4")  # fp32 2:4: stays dense, with the 2:4 reason only
    assert condensed_reason(nm) == ""
    layer = PlannedLayer(nm, EmulatedBackend())
    assert list(layer.forms) == ["dense"] and "16-bit" in layer.reason and "condensed" not in layer.reason


@on_cpu
@pytest.mark.parametrize("stride", [1, 2])
def test_condensed_1x1_conv_form_equals_conv2d_on_channels_last(stride):
    s = spec("Conv2d", (32, 16, 1, 1), conv={"stride": stride, "groups": 1, "padding": 0})
    s.mask[3] = False  # an ablated output channel: its bias
    s.weight[3] = 0
    form = PlannedLayer(s, EmulatedBackend()).forms[NAME]
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = form(x)
    assert rel(y, F.conv2d(x, s.weight, s.bias, stride)) < 1e-5
    assert y.is_contiguous(memory_format=torch.channels_last)


# --- the planner: every kernel config is a candidate ---------------------------------------------------------------

class ConfigTimer:
    """Layer times by ``(key, form)``; a condensed config's by ``(key, form, config index in candidates)``
    (fn not called: a table, not a clock). Models take the sum of their layers' times (original: 100)."""

    def __init__(self, table: dict, names: dict) -> None:
        self.table, self.names, self.calls = table, names, []

    def __call__(self, fn, what):
        self.calls.append(what)
        if what[0] == "layer":
            if len(what) > 3:
                return self.table.get((what[1], what[2], self.names[what[3]]), 1.0)
            return self.table.get((what[1], what[2]), 1.0)
        return 100.0 if what[1] == "original" else 1.0


def mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    ss.sparsify(m, 0.75)
    return m


@on_cpu
def test_planner_times_every_config_and_keeps_the_fastest_where_it_beats_dense(tmp_path):
    m = mlp()
    x = torch.randn(4, 64)
    probe = tc.TritonCondensedLinear(torch.randn(32, 64), fanin_mask((32, 64), 16))
    configs = probe.configs(x)
    assert len(configs) > 2
    names = {c.name: i for i, c in enumerate(configs)}
    # layer 0: config 2 is fastest and beats dense (1.0); layer 2: every config slower than dense
    table = {("0.weight", NAME, 2): 0.25, ("0.weight", NAME, 0): 0.5}
    table |= {("2.weight", NAME, i): 3.0 for i in range(len(configs))}
    timer = ConfigTimer(table, names)
    dep = deploy(m, x, timer=timer)
    lays = {lay.key: lay for _, lay in planned_layers(dep.module)}
    assert lays["0.weight"].choice == NAME and lays["0.weight"].forms[NAME].config == configs[2]
    assert lays["0.weight"].figures["ratio"] == 4.0 and "bb4" in configs[2].name
    assert lays["2.weight"].choice == "dense" and "dense faster" in lays["2.weight"].figures["why"]
    timed = {w[3] for w in timer.calls if w[0] == "layer" and w[1] == "0.weight" and len(w) > 3}
    assert timed == set(names)  # every config was a candidate
    rows = {r.name: r for r in ss.report(dep).layers}
    assert rows["0.weight"].extra["kernel"] == NAME and rows["0.weight"].extra["ratio"] == 4.0
    assert rows["0.weight"].extra["config"] == configs[2].name
    macs = dep.semisparse_plan["macs"]  # 64*32 vs 32*16 MACs per row: 0.8 of the sparse MACs condensed
    assert macs["condensed"] == pytest.approx(64 * 32 / (64 * 32 + 32 * 16), abs=1e-4)
    with torch.no_grad():
        assert rel(dep(x), m(x)) < 1e-5

    # saved plan: choice and config come back, nothing timed, same outputs
    path = tmp_path / "plan.safetensors"
    save_plan(dep, path)

    def no_timer(fn, what):
        raise AssertionError("a loaded plan must not time anything")

    again = deploy(m, x, plan=str(path), timer=no_timer)
    lays2 = {lay.key: lay for _, lay in planned_layers(again.module)}
    assert lays2["0.weight"].choice == NAME and lays2["0.weight"].forms[NAME].config == configs[2]
    assert list(lays2["0.weight"].forms) == [NAME] and lays2["2.weight"].choice == "dense"
    assert torch.equal(again(x), dep(x))


@on_cpu
def test_a_config_that_computes_wrong_results_is_not_kept(monkeypatch):
    m = mlp()
    x = torch.randn(4, 64)
    probe = tc.TritonCondensedLinear(torch.randn(32, 64), fanin_mask((32, 64), 16))
    configs = probe.configs(x)
    names = {c.name: i for i, c in enumerate(configs)}
    bad = configs[1]
    real = CondensedForm.forward

    def broken(self, x):
        y = real(self, x)
        return y + 1.0 if self.config == bad else y

    monkeypatch.setattr(CondensedForm, "forward", broken)
    table = {("0.weight", NAME, 1): 0.1, ("0.weight", NAME, 3): 0.5}
    dep = deploy(m, x, timer=ConfigTimer(table, names))
    lay = next(lay for _, lay in planned_layers(dep.module) if lay.key == "0.weight")
    assert lay.choice == NAME and lay.forms[NAME].config == configs[3]  # the next fastest correct one


# --- whole model through the cuda deploy path ----------------------------------------------------------------------

@on_cpu
def test_tiny_model_fp32_condensed_equals_the_masked_model():
    m = tiny()
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        ref = m(x)
    dep = deploy(m, x, plan="sparse")
    plan = dep.semisparse_plan
    assert plan["dtype"] == "float32" and plan["folded_ablated"] == {"mlp.2.weight": 2}
    lays = {lay.key: lay for _, lay in planned_layers(dep.module)}
    assert set(lays) == {"conv.weight", "down.weight", "attn.in_proj_weight", "attn.out_proj.weight",
                         "mlp.0.weight", "mlp.2.weight", "head.weight"}
    assert all(lay.choice == NAME for lay in lays.values())
    assert lays["mlp.0.weight"].shape == (46, 32) and lays["mlp.2.weight"].shape == (32, 46)
    assert plan["macs"]["condensed"] == 1.0
    out = dep(x)
    assert out.dtype == torch.float32 and rel(out, ref) < 1e-5


# --- semisparse bench --device cuda --pattern fan-in ---------------------------------------------------------------

@on_cpu
def test_bench_condensed_layer_row_times_dense_and_every_config():
    from semisparse.cli.bench_cuda import bench_condensed_layer, format_rows

    def timer(fn, what):  # configs: the 3rd candidate is fastest; dense 1.0 ms
        if what[2] == "dense":
            return 1e-3
        return 0.5e-3 if what[3] == order[2] else 2e-3

    x = torch.randn(2, 64)
    order = [c.name for c in tc.TritonCondensedLinear(torch.randn(16, 64), fanin_mask((16, 64), 6)).configs(x)]
    row = bench_condensed_layer(16, 64, 2, 0.9, torch.float32, timer, "cpu")
    assert row["fan_in"] == 6 and row["ratio"] == 2.0 and row["config"] == order[2]
    assert set(row["configs_ms"]) == set(order) and row["rel_err"] < 1e-5
    assert "condensed ms" in format_rows([row])


@on_cpu
def test_bench_model_row_reports_the_condensed_mac_share():
    from semisparse.cli.bench_cuda import bench_model_cuda, format_rows

    def timer(fn, what):
        if what[0] == "layer":  # condensed configs faster than dense for every layer
            return 0.5e-3 if len(what) > 3 else 1e-3
        return {"deployed": 1.0, "original": 2.0, "all-dense": 1.5, "eager": 3.0}.get(what[1], 1.0) * 1e-3

    def factory():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 40)).eval()

    row = bench_model_cuda(factory, 2, torch.float32, timer=timer, eager_timer=timer, backend=EmulatedBackend(),
                           graphs=EmulatedGraphs(), device="cpu", pattern=0.75, masks="uniform")
    assert row["condensed_mac_share"] == 1.0 and row["sparse_layers"] == 2 == row["layers"]
    assert row["ratio_vs_original"] == 2.0 and row["rel_err_vs_dense"] < 1e-5 and row["pattern"].startswith("fan-in")
    assert {r["kernel"] for r in row["per_layer"]} == {NAME} and all(r["config"] for r in row["per_layer"])
    assert "sparse MACs condensed" in format_rows([row])


@pytest.mark.skipif(not tc.available(), reason="needs a CUDA GPU with triton")
def test_tiny_model_condensed_on_gpu_planned_graphed_and_reloaded(tmp_path):
    m = tiny()
    x = torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        ref = m.cuda()(x.cuda())
    dep = ss.deploy(m.cpu(), device="cuda", example_input=x, plan="sparse")  # fp32, every layer condensed
    assert all(lay.choice == NAME for _, lay in planned_layers(dep.module))
    assert rel(dep(x), ref) < 1e-5
    measured = ss.deploy(m, device="cuda", example_input=x)  # every config timed, graphed
    assert rel(measured(x), ref) < 1e-5
    save_plan(measured, tmp_path / "p.safetensors")
    again = ss.deploy(m, device="cuda", example_input=x, plan=str(tmp_path / "p.safetensors"))
    assert torch.equal(again(x), measured(x))
