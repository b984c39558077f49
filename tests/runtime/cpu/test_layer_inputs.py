"""Deployed layers take what the original layer takes and refuse what it refuses, with the C kernels and
without; the kernel entry points never touch memory outside the tensors they are given."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import semisparse as ss
from helpers.kernel_switch import kernels_off
from semisparse.errors import SemisparseError
from semisparse.runtime import deploy, deployed_layers
from semisparse.runtime.cpu import kernels

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler: fast kernels unavailable")


def outcome(fn, *args):
    """``(output, None)`` or ``(None, exception type)``."""
    try:
        with torch.no_grad():
            return fn(*args), None
    except Exception as exc:  # what the original raises, whatever it is, is what the deployed layer must raise
        return None, type(exc)


def assert_same_outcome(dep: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    got, got_exc = outcome(dep, x)
    want, want_exc = outcome(ref, x)
    assert got_exc == want_exc, f"input {tuple(x.shape)} {x.dtype}: deployed {got_exc}, original {want_exc}"
    if want is not None:
        assert got.shape == want.shape and got.dtype == want.dtype
        if want.numel():
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
            assert err <= 1e-5, f"input {tuple(x.shape)}: max relative error {err:.2e}"


def _masked_linear() -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    m = torch.rand(5, 6) < 0.5
    m[:, 0] = True
    m[3] = False  # an ablated neuron
    ss.sparsify(lin, None, masks={"weight": m})
    return lin.eval()


def _masked_conv() -> nn.Conv2d:
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    ss.sparsify(conv, 0.5)
    return conv.eval()


@functools.cache
def _deployed(kind: str, with_kernels: bool) -> tuple[nn.Module, nn.Module]:
    ref = _masked_linear() if kind == "linear" else _masked_conv()
    if with_kernels:
        return deploy(ref, plan="condensed"), ref
    with kernels_off():
        dep = deploy(ref, plan="condensed")
    for _, layer in deployed_layers(dep):
        layer.set_mode("condensed")  # the reference index arithmetic, not the dense fallback
    return dep, ref


BAD_LINEAR = [torch.randn(1, 3), torch.randn(1, 12), torch.randn(2, 4, 3), torch.randn(()), torch.randn(6, 1),
              torch.randint(0, 3, (2, 6)), torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6).bool()]


@pytest.mark.parametrize("with_kernels", [True, False])
@pytest.mark.parametrize("x", BAD_LINEAR, ids=lambda x: f"{tuple(x.shape)}-{x.dtype}")
def test_linear_refuses_what_nn_linear_refuses(x, with_kernels):
    if with_kernels and not kernels.available():
        pytest.skip("no C kernels")
    dep, ref = _deployed("linear", with_kernels)
    with pytest.raises(RuntimeError):
        ref(x)
    ctx = contextlib.nullcontext() if with_kernels else kernels_off()
    with ctx, pytest.raises(RuntimeError):
        dep(x)


def test_big_linear_too_short_or_too_long_input_raises_not_reads_past_it():
    torch.manual_seed(2)
    lin = nn.Linear(3072, 768)
    ss.sparsify(lin, 0.9)
    dep = deploy(lin, plan="condensed")
    for x in (torch.randn(1, 1536), torch.randn(1, 6144), torch.randn(4, 1536)):
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            dep(x)


BAD_CONV = [torch.randn(1, 2, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(8, 8), torch.randn(1, 1, 3, 8, 8),
            torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (1, 3, 8, 8)), torch.randn(1, 3, 1, 0)]


@pytest.mark.parametrize("with_kernels", [True, False])
@pytest.mark.parametrize("x", BAD_CONV, ids=lambda x: f"{tuple(x.shape)}-{x.dtype}")
def test_conv_refuses_what_nn_conv_refuses(x, with_kernels):
    if with_kernels and not kernels.available():
        pytest.skip("no C kernels")
    dep, ref = _deployed("conv", with_kernels)
    with pytest.raises(RuntimeError):
        ref(x)
    ctx = contextlib.nullcontext() if with_kernels else kernels_off()
    with ctx, pytest.raises(RuntimeError):
        dep(x)


def test_conv_given_half_its_channels_raises_instead_of_reading_garbage():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3)
    ss.sparsify(conv, 0.5)
    dep = deploy(conv, plan="condensed")
    for n in (1, 2):
        with pytest.raises(RuntimeError, match="channels"):
            dep(torch.randn(n, 4, 8, 8))


def test_input_smaller_than_the_kernel_raises_torchs_error():
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, 5)
    ss.sparsify(conv, 0.5)
    dep = deploy(conv, plan="condensed")
    x = torch.randn(2, 3, 3, 3)
    with pytest.raises(RuntimeError) as want:
        conv(x)
    with pytest.raises(RuntimeError, match=str(want.value).split("(")[0]):
        dep(x)


@pytest.mark.parametrize("with_kernels", [True, False])
def test_empty_batch_returns_an_empty_output(with_kernels):
    if with_kernels and not kernels.available():
        pytest.skip("no C kernels")
    for kind, x in (("linear", torch.randn(0, 6)), ("linear", torch.randn(3, 0, 6)), ("conv", torch.randn(0, 3, 8, 8))):
        dep, ref = _deployed(kind, with_kernels)
        with contextlib.nullcontext() if with_kernels else kernels_off(), torch.no_grad():
            y = dep(x)
        assert y.shape == ref(x).shape and y.numel() == 0


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["linear", "conv"]), with_kernels=st.booleans(),
       lead=st.lists(st.integers(0, 3), max_size=3), last=st.one_of(st.none(), st.integers(0, 12)),
       spatial=st.lists(st.integers(0, 9), min_size=0, max_size=3), dtype=st.sampled_from(
           [torch.float32, torch.float32, torch.float32, torch.float64, torch.int64]),
       contiguous=st.booleans())
def test_property_any_input_shape_raises_as_the_original_or_equals_it(kind, with_kernels, lead, last, spatial, dtype,
                                                                     contiguous):
    """Right shapes equal the masked model; wrong ones raise what it raises (none reads outside the input)."""
    if with_kernels and not kernels.available():
        with_kernels = False
    dep, ref = _deployed(kind, with_kernels)
    if kind == "linear":
        shape = [*lead, 6 if last is None else last]
    else:
        shape = [*lead[:1], 3 if last is None else last, *(spatial or [7, 6])]
    x = torch.randn(shape) if dtype.is_floating_point else torch.randint(-3, 3, shape)
    x = x.to(dtype)
    if not contiguous and x.dim() >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    with contextlib.nullcontext() if with_kernels else kernels_off():
        assert_same_outcome(dep, ref, x)


# ---- the kernel entry points: every argument checked against what the C code touches ---------------------------

def _linear_problem(rows=5, K=20, k=4, PB=8, P=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.sort(torch.rand(rows, K, generator=g).argsort(1)[:, :k], 1).values
    W = torch.randn(rows, k, generator=g)
    off = kernels.offsets(idx.to(torch.int16), torch.arange(K, dtype=torch.int64) * PB,
                          torch.zeros(rows, dtype=torch.int64))
    npan = -(-P // PB)
    X = torch.randn(npan * K * PB + kernels.BLOCK, generator=g)
    return W, idx.to(torch.int16), off, X, torch.arange(rows), npan


@pytest.mark.parametrize("with_kernels", [True, False])
def test_spmm_refuses_arguments_that_would_read_or_write_outside_them(with_kernels):
    if with_kernels and not kernels.available():
        pytest.skip("no C kernels")
    W, idx, off, X, orow, npan = _linear_problem()
    P, PB, K = 9, 8, 20
    Y = torch.zeros(5, P)
    ctx = contextlib.nullcontext() if with_kernels else kernels_off()
    with ctx:
        kernels.spmm(X, W, off, None, orow, Y, P, P, PB, K * PB)  # fits
        bad = [
            dict(X=X[: npan * K * PB - 1]),  # too short for the last block's reads
            dict(Y=torch.zeros(5, P - 1)),  # too short for the last row's writes
            dict(orow=torch.tensor([0, 1, 2, 3, 5])),  # a row past Y
            dict(orow=torch.tensor([0, 1, -1, 3, 4])),
            dict(off=off.clone().index_fill_(1, torch.tensor([0]), -1)),  # negative offset
            dict(P=P + 20),  # more positions than X holds
            dict(X=X.double()), dict(W=W[:, :3].contiguous()), dict(off=off.long()), dict(orow=orow.int()),
            dict(bias=torch.zeros(4)), dict(X=X[::2]), dict(PB=12), dict(ldy=-1),
        ]
        for change in bad:
            args = dict(X=X, W=W, off=off, bias=None, orow=orow, Y=Y, P=P, ldy=P, PB=PB, panel=K * PB)
            args.update(change)
            if "Y" in change:
                args["ldy"] = args["Y"].shape[1]
            with pytest.raises(ValueError, match="semisparse kernels"):
                kernels.spmm(**args)


@settings(max_examples=40, deadline=None)
@given(P=st.integers(0, 70), PB=st.sampled_from([8, 16, 32, 64]), short=st.integers(-80, 8),
       extra_rows=st.integers(-1, 1), tiled=st.booleans(), with_kernels=st.booleans())
def test_property_spmm_either_refuses_or_equals_the_reference(P, PB, short, extra_rows, tiled, with_kernels):
    """Any X length and Y height: a ValueError, or exactly the reference result (which indexes with bounds checks)."""
    if tiled and PB not in (32, 64):
        PB = 32
    rows, K, k = 4, 10, 3
    W, idx, off, X, orow, npan = _linear_problem(rows, K, k, PB, max(P, 1))
    X = torch.randn(max(0, npan * K * PB + short))
    Y, want = torch.zeros(rows + extra_rows, max(P, 1)), torch.zeros(rows + extra_rows, max(P, 1))
    ctx = contextlib.nullcontext() if with_kernels and kernels.available() else kernels_off()
    try:
        with ctx:
            if tiled:
                Ws, offs, seg = kernels.tile(W, off, idx.long() % K, 3)
                kernels.spmm_tiled(X, Ws, offs, seg, None, orow, Y, P, Y.shape[1], PB, K * PB)
            else:
                kernels.spmm(X, W, off, None, orow, Y, P, Y.shape[1], PB, K * PB)
    except ValueError:
        return
    kernels.spmm_reference(X, W, off, None, orow, want, P, want.shape[1], PB, K * PB)  # raises if out of bounds
    torch.testing.assert_close(Y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_kernels", [True, False])
def test_gemv_refuses_short_vectors_and_changed_indices(with_kernels):
    if with_kernels and not kernels.available():
        pytest.skip("no C kernels")
    W, idx, _, _, orow, _ = _linear_problem(rows=5, K=20)
    need = int(idx.long().max()) + 1
    ctx = contextlib.nullcontext() if with_kernels else kernels_off()
    with ctx:
        kernels.gemv(torch.randn(need), W, idx, None, orow, torch.zeros(5))
        for x, y in ((torch.randn(need - 1), torch.zeros(5)), (torch.randn(need), torch.zeros(4)),
                     (torch.randn(need).double(), torch.zeros(5)), (torch.randn(2 * need)[::2], torch.zeros(5))):
            with pytest.raises(ValueError, match="semisparse kernels"):
                kernels.gemv(x, W, idx, None, orow, y)
    if with_kernels:
        run = kernels.gemv_binding(W, idx, None, orow)
        run(torch.randn(need), torch.zeros(5))
        with pytest.raises(ValueError):
            run(torch.randn(need - 1), torch.zeros(5))
        idx.fill_(1000)  # changed in place after binding: never read with the old bounds
        with pytest.raises(ValueError, match="bind again"):
            run(torch.randn(need), torch.zeros(5))


@needs_kernels
def test_bound_conv_refuses_inputs_and_outputs_of_other_sizes():
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    ss.sparsify(conv, 0.5)
    dep = deploy(conv, plan="condensed")
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        dep(x)
    run = dep.__dict__["_fast_conv"][1]
    for xx, out in ((torch.randn(1, 4, 9, 8), torch.empty(1, 6, 9, 9)), (x, torch.empty(1, 6, 9, 8)),
                    (x.double(), torch.empty(1, 6, 9, 9)), (x, torch.empty(1, 6, 9, 9, dtype=torch.float64))):
        with pytest.raises(ValueError, match="semisparse kernels"):
            run(xx, out)


def test_conv_plan_that_does_not_fit_its_buffers_is_refused():
    torch.manual_seed(6)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    ss.sparsify(conv, 0.5)
    dep = deploy(conv, plan="condensed")
    g = dep._plan_geometry(1, (9, 9))
    geo = dict(C=4, H0=9, W0=9, sh=1, sw=1, H=9, W=9, pt=1, pl=1, Hp=11, Wp=11, cs=g["c_stride"], stH=1, stW=1,
               Hq=11, Wq=11, P=g["P"], Ho=9, Wo=9)
    args = (dep.values, g["off"], None, dep.bias_rows(), dep.orow, dep.ablated, torch.zeros(0), 64, 0, 6)
    kernels.conv2d_binding(geo, *args)  # consistent: accepted
    for change in (dict(C=3), dict(cs=10), dict(P=200), dict(Ho=12), dict(H=8), dict(pl=3), dict(Wq=8)):
        with pytest.raises(ValueError, match="semisparse kernels"):
            kernels.conv2d_binding({**geo, **change}, *args)
    with pytest.raises(ValueError, match="output channels"):
        kernels.conv2d_binding(geo, *args[:-1], 3)


@pytest.mark.parametrize("with_kernels", [True, False])
def test_fill_rows_maxpool_transpose_and_packing_check_their_arguments(with_kernels):
    if with_kernels and not kernels.available():
        pytest.skip("no C kernels")
    ctx = contextlib.nullcontext() if with_kernels else kernels_off()
    with ctx:
        with pytest.raises(ValueError):
            kernels.fill_rows(torch.zeros(3, 4), torch.tensor([3]), torch.ones(1), 4, 4)
        with pytest.raises(ValueError):
            kernels.fill_rows(torch.zeros(3, 4), torch.tensor([1]), torch.ones(2), 4, 4)
        x = torch.randn(2, 8, 8)
        assert kernels.maxpool2d(x, (3, 3), (2, 2), (1, 1), (4, 4)) is not None or not with_kernels
        for out_hw in ((6, 4), (4, 6)):  # a window that starts past the input
            with pytest.raises(ValueError):
                kernels.maxpool2d(x, (3, 3), (2, 2), (1, 1), out_hw)
        with pytest.raises(ValueError):
            kernels.maxpool2d(x.double(), (3, 3), (2, 2), (1, 1), (4, 4))
        for bad in (torch.randn(4, 6)[:, ::2], torch.randn(4, 6).double(), torch.randn(2, 3, 4)):
            with pytest.raises(ValueError):
                kernels.transpose(bad)
            with pytest.raises(ValueError):
                kernels.pack_panels(bad, 8)


def test_deploy_reps_zero_and_an_example_input_that_does_not_fit_are_one_line_errors():
    lin = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    ss.sparsify(lin, 0.5)
    for reps in (0, -3, 2.5):
        with pytest.raises(SemisparseError, match="reps") as info:
            deploy(lin, reps=reps)
        assert "\n" not in str(info.value)
    for plan in ("condensed", "measure", "dense"):
        with pytest.raises(SemisparseError, match="example_input") as info:
            deploy(lin, plan=plan, example_input=torch.randn(1, 5))
        assert "\n" not in str(info.value)
    dep = deploy(lin, plan="condensed", example_input=torch.randn(2, 16))
    assert not dep.training


@pytest.mark.parametrize("with_kernels", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_under_cpu_autocast_condensed_layers_return_the_autocast_dtype_as_the_masked_model(with_kernels, batch,
                                                                                          in_dtype):
    """``nn.Linear``/``nn.Conv2d`` under CPU autocast return bf16; the condensed layers returned fp32 from an fp32
    input (and a bf16 input left the kernels for torch's op). They now compute in fp32 and return bf16: the masked
    model's dtypes, values within bf16 rounding of the masked model's (which computes in bf16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 64),
                          nn.ReLU(), nn.Linear(64, 10)).eval()
    ss.sparsify(model, 0.75)
    dep = deploy(model, batch_size=batch, example_input=torch.randn(batch, 3, 8, 8), reps=1)
    for _, layer in deployed_layers(dep):
        layer.set_mode("condensed")
    x = torch.randn(batch, 3, 8, 8)
    ctx = contextlib.nullcontext() if with_kernels else kernels_off()
    with ctx, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x.to(in_dtype))
        got = dep(x.to(in_dtype))
        inner = [dep[i](torch.randn(batch, dep[i].in_features, dtype=in_dtype)) for i in (3, 5)]
    assert got.dtype == want.dtype == torch.bfloat16
    assert all(y.dtype == torch.bfloat16 for y in inner)
    with torch.no_grad():
        exact = model(x.to(in_dtype).float())
    err = float((got.float() - exact).abs().max() / exact.abs().max())
    ref_err = float((want.float() - exact).abs().max() / exact.abs().max())
    assert err <= max(2 * ref_err, 2 ** -7), (err, ref_err)  # no worse than the masked model's own bf16 rounding
    with torch.no_grad():  # and outside autocast nothing changed: fp32, equal to the masked model
        assert dep(x).dtype == torch.float32
        assert float((dep(x) - model(x)).abs().max() / model(x).abs().max()) <= 1e-5
