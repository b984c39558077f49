"""The Triton condensed kernels equal the masked dense layer (run on CPU under the Triton interpreter)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from semisparse.errors import SemisparseError
from semisparse.runtime.cuda import kernels as tc

pytest.importorskip("triton", reason="triton is not installed: the condensed GPU kernels cannot be tested")
#: Compiled kernels where a GPU is present, else the Triton interpreter on CPU (tests/conftest.py turns it on).
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not tc.interpreting():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (it must be set before triton is imported; "
                "tests/conftest.py does so)", allow_module_level=True)


def fan_in_mask(out_f: int, in_f: int, k: int, ablate: tuple[int, ...] = (), seed: int = 0) -> torch.Tensor:
    """Constant fan-in ``k`` per row (random columns), ``ablate`` rows all zero."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.rand(out_f, in_f, generator=g).argsort(1)[:, :k]
    m = torch.zeros(out_f, in_f, dtype=torch.bool).scatter_(1, cols, True)
    m[list(ablate)] = False
    return m


def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` on the test device, back on CPU."""
    return layer.to(DEV)(x.to(DEV)).cpu()


def reference(x, w, m, b):
    """The masked dense layer in float64 from the same (dtype-rounded) operands."""
    return F.linear(x.double(), (w * m).to(x.dtype).double(), None if b is None else b.to(x.dtype).double())


def close(y, ref, dtype):
    """fp32: 1e-5 relative to the output's scale; bf16/fp16: a few units of the format's last place."""
    scale = ref.abs().max().item() or 1.0
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * scale)


# shapes: (out, in, k, batch, ablated rows); k not a multiple of any block, batch not a multiple of BB
SHAPES = [(20, 37, 11, 1, ()), (20, 37, 11, 5, (0, 7, 19)), (24, 50, 9, 3, (4,)), (13, 40, 40, 2, ()),
          (17, 64, 5, 70, (16,))]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-k{s[2]}-b{s[3]}-abl{len(s[4])}")
@pytest.mark.parametrize("bias", [True, False])
def test_linear_fp32_equals_masked_dense_with_default_config(shape, bias):
    out_f, in_f, k, batch, ablated = shape
    torch.manual_seed(0)
    w, b = torch.randn(out_f, in_f), (torch.randn(out_f) if bias else None)
    m = fan_in_mask(out_f, in_f, k, ablated)
    layer = tc.TritonCondensedLinear(w, m, b)
    assert layer.n_kept == out_f - len(ablated) and layer.fan_in == k and layer.values.shape[1] % 16 == 0
    x = torch.randn(batch, in_f)
    close(run(layer, x), reference(x, w, m, b), torch.float32)


PLANNER_CASES = [(batch, cfg) for batch in (1, 6, 70) for cfg in tc.configs_for(batch, 7)]


@pytest.mark.parametrize("batch,cfg", PLANNER_CASES, ids=lambda c: c.name if isinstance(c, tc.KernelConfig) else c)
def test_every_planner_config_equals_masked_dense(batch, cfg):
    """Each setting the planner may pick computes the same layer (split-k, transposed input, block sizes)."""
    out_f, in_f, k = 18, 45, 7
    torch.manual_seed(batch)
    w, b = torch.randn(out_f, in_f), torch.randn(out_f)
    m = fan_in_mask(out_f, in_f, k, ablate=(2, 17))
    layer = tc.TritonCondensedLinear(w, m, b)
    assert cfg in tc.candidates(layer, torch.empty(batch, in_f))
    layer.use_config(cfg)
    x = torch.randn(batch, in_f)
    close(run(layer, x), reference(x, w, m, b), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,split", [(1, 1), (1, 4), (9, 1), (9, 2)])
def test_linear_half_precision_within_format_tolerance(dtype, batch, split):
    out_f, in_f, k = 21, 60, 13
    torch.manual_seed(1)
    w, b = torch.randn(out_f, in_f), torch.randn(out_f)
    m = fan_in_mask(out_f, in_f, k, ablate=(3,))
    layer = tc.TritonCondensedLinear(w, m, b).to(dtype)
    assert layer.values.dtype == dtype and layer.idx.dtype == torch.int16
    base = layer.configs(torch.empty(batch, in_f))[0]
    layer.use_config(tc.KernelConfig(base.block_out, base.block_k, base.block_batch, split, base.num_warps))
    x = torch.randn(batch, in_f).to(dtype)
    close(run(layer, x), reference(x, w, m, b), dtype)


@settings(max_examples=8, deadline=None)
@given(out_f=st.integers(1, 24), in_f=st.integers(1, 40), batch=st.integers(1, 9), data=st.data())
def test_any_shape_fan_in_ablation_and_config_equals_masked_dense(out_f, in_f, batch, data):
    k = data.draw(st.integers(1, in_f), label="k")
    ablated = data.draw(st.sets(st.integers(0, out_f - 1), max_size=out_f), label="ablated")
    cfg = data.draw(st.sampled_from(tc.configs_for(batch, k)), label="config")
    torch.manual_seed(out_f * 1000 + in_f)
    w, b = torch.randn(out_f, in_f), torch.randn(out_f)
    m = fan_in_mask(out_f, in_f, k, tuple(ablated))
    layer = tc.TritonCondensedLinear(w, m, b)
    layer.use_config(cfg)
    x = torch.randn(batch, in_f)
    close(run(layer, x), reference(x, w, m, b), torch.float32)


def test_linear_keeps_leading_dims_and_unbatched_input():
    torch.manual_seed(2)
    w, b = torch.randn(10, 16), torch.randn(10)
    m = fan_in_mask(10, 16, 4)
    layer = tc.TritonCondensedLinear(w, m, b)
    x = torch.randn(2, 3, 16)
    y = run(layer, x)
    assert y.shape == (2, 3, 10)
    close(y, reference(x, w, m, b), torch.float32)
    x1 = torch.randn(16)
    y1 = run(layer, x1)
    assert y1.shape == (10,)
    close(y1, reference(x1, w, m, b), torch.float32)
    xs = torch.randn(16, 5).t()  # non-contiguous (5, 16)
    close(layer(xs.to(DEV)).cpu(), reference(xs, w, m, b), torch.float32)


def test_wide_input_uses_uint16_indices_above_32k():
    out_f, in_f = 4, 40_000
    w = torch.randn(out_f, in_f)
    m = torch.zeros(out_f, in_f, dtype=torch.bool)
    m[:, [5, 32_767, 32_768, 39_999]] = True  # columns whose uint16 bits are negative as int16
    layer = tc.TritonCondensedLinear(w, m)
    assert layer.idx.dtype == torch.int16 and int(layer.idx.min()) < 0
    x = torch.randn(2, in_f)
    close(run(layer, x), reference(x, w, m, None), torch.float32)


def test_every_neuron_ablated_outputs_the_bias():
    w, b = torch.randn(5, 8), torch.randn(5)
    layer = tc.TritonCondensedLinear(w, torch.zeros(5, 8, dtype=torch.bool), b)
    assert layer.n_kept == 0
    torch.testing.assert_close(run(layer, torch.randn(3, 8)), b.expand(3, 5))


def test_from_cpu_condensed_form_equals_from_mask():
    from semisparse.runtime.cpu.layers import condense

    torch.manual_seed(3)
    w, b = torch.randn(12, 30), torch.randn(12)
    m = fan_in_mask(12, 30, 6, ablate=(5,))
    values, idx, orow = condense(w, m)
    layer = tc.TritonCondensedLinear.from_condensed(values, idx, orow, 30, 12, b)
    torch.testing.assert_close(layer.dense_weight(), w * m)
    x = torch.randn(4, 30)
    close(run(layer, x), reference(x, w, m, b), torch.float32)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("n", [1, 2])
def test_conv1x1_equals_masked_dense_conv_in_both_memory_formats(channels_last, n):
    torch.manual_seed(4)
    conv = nn.Conv2d(24, 10, 1)
    m = fan_in_mask(10, 24, 5, ablate=(6,)).view(10, 24, 1, 1)
    layer = tc.build(conv, m)
    assert isinstance(layer, tc.TritonCondensedConv)
    x = torch.randn(n, 24, 3, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = run(layer, x)
    ref = F.conv2d(x.double(), (conv.weight * m).double().detach(), conv.bias.double().detach())
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    close(y, ref, torch.float32)
    close(run(layer, x[0]), ref[0], torch.float32)  # unbatched (C, H, W)


@pytest.mark.parametrize("channels_last", [True, False])
def test_conv1x1_bf16_split_k(channels_last):
    """Split-k's second pass scatters position m = n*P + p back to sample n (NCHW keeps samples apart)."""
    torch.manual_seed(5)
    conv = nn.Conv2d(32, 8, 1, bias=False)
    m = fan_in_mask(8, 32, 7).view(8, 32, 1, 1)
    layer = tc.build(conv, m).to(torch.bfloat16)
    assert not any(c.transpose_input for c in layer.configs(torch.empty(2, 32, 2, 3)))
    layer.use_config(tc.KernelConfig(8, 4, 4, split=2))
    x = torch.randn(2, 32, 2, 3).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    ref = F.conv2d(x.double(), (conv.weight * m).to(torch.bfloat16).double().detach())
    close(run(layer, x), ref, torch.bfloat16)


def test_build_refuses_convs_that_are_not_a_gemm():
    assert tc.build(nn.Conv2d(4, 4, 3), torch.ones(4, 4, 3, 3, dtype=torch.bool)) is None
    assert "stride" in tc.unsupported_reason(nn.Conv2d(4, 4, 1, stride=2))
    assert "groups" in tc.unsupported_reason(nn.Conv2d(4, 4, 1, groups=2))
    assert tc.unsupported_reason(nn.Conv2d(4, 4, 1)) == "" and tc.unsupported_reason(nn.Linear(3, 2)) == ""


def test_bad_input_raises_semisparse_error(monkeypatch):
    layer = tc.TritonCondensedLinear(torch.randn(4, 6), fan_in_mask(4, 6, 2)).to(DEV)
    with pytest.raises(SemisparseError, match="size 6"):
        layer(torch.randn(2, 5, device=DEV))
    with pytest.raises(SemisparseError, match="bfloat16 input"):
        layer(torch.randn(2, 6, dtype=torch.bfloat16, device=DEV))
    conv = tc.build(nn.Conv2d(6, 4, 1), fan_in_mask(4, 6, 2).view(4, 6, 1, 1)).to(DEV)
    with pytest.raises(SemisparseError, match="input channels"):
        conv(torch.randn(1, 5, 2, 2, device=DEV))
    with pytest.raises(SemisparseError, match="4-D"):
        conv(torch.randn(6, 2, device=DEV))
    with pytest.raises(SemisparseError, match="power of two"):
        tc.KernelConfig(3, 4, 4)
    cpu_layer = layer.cpu()
    monkeypatch.setattr(tc, "interpreting", lambda: False)
    with pytest.raises(SemisparseError, match="CUDA tensors"):
        cpu_layer(torch.randn(2, 6))


def test_input_needing_grad_runs_dense_with_the_same_gradients():
    torch.manual_seed(6)
    w, b = torch.randn(6, 9), torch.randn(6)
    m = fan_in_mask(6, 9, 3)
    layer = tc.TritonCondensedLinear(w, m, b)
    x = torch.randn(2, 9, device=DEV, requires_grad=True)
    layer.to(DEV)(x).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), (w * m).sum(0).expand(2, 9))


def test_module_imports_without_triton(monkeypatch):
    """A machine without Triton imports the module; available() says no and a launch says why."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_tc_no_triton", tc.__file__,
                                                  submodule_search_locations=None)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "_tc_no_triton", mod)  # dataclasses look their module up
    mod.__package__ = "semisparse.runtime.cuda"
    spec.loader.exec_module(mod)
    assert mod.triton is None and not mod.available() and not mod.interpreting()
    with pytest.raises(SemisparseError, match="triton is not installed"):
        mod._kernels()
