"""Nothing done to a deployed model between calls makes the kernels read or write outside their buffers;
the kernel library is verified before it is loaded; graphs that cannot hold the kernels get torch's ops;
NaN/Inf in inputs that only pruned weights read do not reach the outputs of condensed layers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semisparse as ss
from helpers import paths
from helpers.kernel_switch import kernels_off
from semisparse.errors import SemisparseError
from semisparse.indices import columns
from semisparse.runtime import deploy, deployed_layers
from semisparse.runtime.cpu import kernels
from semisparse.runtime.cpu.kept import _KeptDense, as_torch_layer
from semisparse.runtime.cpu.layers import condense
from semisparse.runtime.swap import replace_everywhere

SRC = str(paths.SRC)
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler: fast kernels unavailable")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter importing this checkout's semisparse (a crash there is only a return
    code here)."""
    full = {**os.environ, "PYTHONPATH": SRC, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          timeout=300)


# ---------------------------------------------------------------------------------------------------------
# stored tensors changed between calls


@needs_kernels
def test_out_of_range_indices_and_freed_weights_are_refused_or_never_read():
    """Deployed under inference_mode (tensors without version counters): a bad orow loaded, written in place,
    or written behind torch's back (``.data``) is refused in one line or never read; weights whose storage
    was resized away are refused; the kernel functions measure a tensor's range at every call. No crash."""
    r = run_python("""
        import torch, semisparse as ss
        from torch import nn
        from semisparse.errors import SemisparseError
        torch.manual_seed(0)
        models = {"linear": (nn.Sequential(nn.Linear(64, 32)), torch.randn(1, 64)),
                  "conv": (nn.Sequential(nn.Conv2d(8, 12, 3, padding=1)), torch.randn(1, 8, 9, 9))}
        for name, (m, x) in models.items():
            ss.sparsify(m, 0.75)
            with torch.inference_mode():
                d = ss.deploy(m, plan="condensed")
                lay = d[0]
                ref = d(x).clone()
                sd = {k: v.clone() for k, v in d.state_dict().items()}
                good = sd["0.orow"].clone()
                sd["0.orow"][0] = 10**9
                try:
                    d.load_state_dict(sd)
                    raise SystemExit("load accepted an out-of-range orow")
                except SemisparseError as exc:
                    assert "\\n" not in str(exc) and "orow" in str(exc), str(exc)
                assert int(lay.orow.max()) < 32 and torch.equal(d(x), ref)  # nothing was loaded
                lay.orow[0] = 10**9  # in place, in inference mode
                try:
                    d(x)
                    raise SystemExit("call ran with an out-of-range orow")
                except SemisparseError as exc:
                    assert "\\n" not in str(exc) and "orow" in str(exc), str(exc)
                lay.orow.copy_(good)  # put back: the layer runs again, exactly as before
                assert torch.equal(d(x), ref)
            with torch.inference_mode():
                d2 = ss.deploy(m, plan="condensed")
                ref = d2(x).clone()
                d2[0].orow.data[0] = 10**9  # behind torch's back: no version bump, never read
                d2[0].idx.data.fill_(-1)
                assert torch.equal(d2(x), ref)
                assert torch.allclose(d2(torch.cat([x, x])), torch.cat([ref, ref]), rtol=1e-5, atol=1e-5)
            # the storage of the bound weights resized away: a one-line error, no read of freed memory
            d3 = ss.deploy(m, plan="condensed")
            with torch.no_grad():
                d3(x)
                d3[0].values.untyped_storage().resize_(0)
                try:
                    d3(x)
                    raise SystemExit("ran on freed weights")
                except ValueError as exc:
                    assert "\\n" not in str(exc) and "storage" in str(exc), str(exc)
        # kernel functions given tensors: a range is never remembered between calls
        from semisparse.runtime.cpu import kernels
        W, off = torch.randn(3, 2), torch.zeros(3, 2, dtype=torch.int32)
        with torch.inference_mode():
            Y, X, orow = torch.zeros(3, 8), torch.randn(8 + kernels.BLOCK), torch.arange(3)
            kernels.spmm(X, W, off, None, orow, Y, 8, 8, 8, 8)
            orow[2] = 10**9
            try:
                kernels.spmm(X, W, off, None, orow, Y, 8, 8, 8, 8)
                raise SystemExit("spmm wrote past Y")
            except ValueError as exc:
                assert "do not fit Y" in str(exc), str(exc)
        print("OK")
    """)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), (r.returncode, r.stdout[-500:], r.stderr[-2000:])


@needs_kernels
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_replaced_values_are_rebound_and_batch_sizes_agree(kind):
    """``layer.values.data = new`` (a common idiom): the bound batch-1 call must not keep the old storage."""
    torch.manual_seed(1)
    if kind == "linear":
        layer, x = nn.Linear(48, 20, bias=False), torch.randn(1, 48)
    else:
        layer, x = nn.Conv2d(6, 10, 3, padding=1, bias=False), torch.randn(1, 6, 7, 7)
    ss.sparsify(layer, 0.75)
    dep = deploy(layer, plan="condensed")
    with torch.no_grad():
        ref = layer(x)
        torch.testing.assert_close(dep(x), ref)  # binds the batch-1 call
        dep.values.data = dep.values * 3  # the old storage is freed unless someone holds it
        torch.testing.assert_close(dep(x), 3 * ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dep(torch.cat([x, x]))[:1], 3 * ref, rtol=1e-5, atol=1e-5)
        dep.values = dep.values / 3  # a new tensor in the buffer's place
        torch.testing.assert_close(dep(x), ref, rtol=1e-5, atol=1e-5)


def test_load_state_dict_refuses_inconsistent_entries_and_changes_nothing():
    torch.manual_seed(2)
    lin = nn.Linear(30, 8)
    m = torch.rand(8, 30) < 0.3
    m[3] = False  # an ablated row
    ss.sparsify(lin, None, masks={"weight": m})
    dep = deploy(lin, plan="condensed")
    x = torch.randn(2, 30)
    with torch.no_grad():
        ref = dep(x)
    good = dep.state_dict()
    bad_entries = {
        "idx": lambda t: t.fill_(30),  # column past the input
        "orow": lambda t: t.flip(0),  # not ascending
        "ablated": lambda t: t.fill_(0),  # does not complement orow
    }
    for name, edit in bad_entries.items():
        sd = {k: v.clone() for k, v in good.items()}
        sd[name] = edit(sd[name])
        with pytest.raises(SemisparseError, match=name) as info:
            dep.load_state_dict(sd)
        assert "\n" not in str(info.value)
        assert all(torch.equal(v, good[k]) for k, v in dep.state_dict().items())
    sd = {k: v.clone() for k, v in good.items()}
    sd["idx"] = sd["idx"].float()
    with pytest.raises(SemisparseError, match="integers"):
        dep.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), ref)


def test_a_table_is_a_copy_measured_once():
    orow = torch.arange(3)
    t = kernels.Table(orow)
    orow[0] = 5
    assert (t.lo, t.hi) == (0, 2) and t.tensor().tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="integer"):
        kernels.Table(torch.zeros(3))


# ---------------------------------------------------------------------------------------------------------
# the kernel library on disk


@needs_kernels
def test_library_is_verified_against_its_recorded_size_and_digest(tmp_path):
    lib = kernels.build._path
    assert lib is not None and kernels.build._verified(lib)
    copy = tmp_path / lib.name
    shutil.copy(lib, copy)
    assert not kernels.build._verified(copy)  # no record: never loaded
    shutil.copy(kernels.build._sidecar(lib), kernels.build._sidecar(copy))
    assert kernels.build._verified(copy)
    record = json.loads(kernels.build._sidecar(copy).read_text())
    assert record["size"] == copy.stat().st_size and len(record["sha256"]) == 64
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01  # altered, same size, still loadable
    copy.write_bytes(bytes(data))
    assert not kernels.build._verified(copy)
    copy.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    assert not kernels.build._verified(copy)
    kernels.build._sidecar(copy).write_text("{not json")
    assert not kernels.build._verified(copy)


def _cached_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "kernels"
    dest.mkdir()
    shutil.copy(kernels.build._path, dest / kernels.build._path.name)
    shutil.copy(kernels.build._sidecar(kernels.build._path), dest / kernels.build._sidecar(kernels.build._path).name)
    return dest / kernels.build._path.name


_USE_KERNELS = """
    import torch
    from semisparse.runtime.cpu import kernels
    assert kernels.available(), kernels.unavailable_reason()
    W, idx, x = torch.ones(2, 3), torch.tensor([[0, 1, 2], [1, 2, 3]], dtype=torch.int16), torch.arange(4.0)
    y = torch.zeros(2)
    kernels.gemv(x, W, idx, None, torch.arange(2), y)
    assert y.tolist() == [3.0, 6.0], y
    print("OK", kernels.build._path)
"""


@needs_kernels
def test_truncated_cached_library_is_rebuilt_not_loaded(tmp_path):
    """A truncated .so in the cache killed every later process with SIGBUS inside dlopen."""
    lib = _cached_copy(tmp_path)
    lib.write_bytes(lib.read_bytes()[:4096])
    r = run_python(_USE_KERNELS, SEMISPARSE_CACHE=str(tmp_path))
    assert r.returncode == 0 and "OK" in r.stdout, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert kernels.build._verified(lib) and lib.stat().st_size == kernels.build._path.stat().st_size
    assert [p.name for p in lib.parent.iterdir() if p.name.startswith(".tmp-")] == []


@needs_kernels
@pytest.mark.slow
def test_altered_cached_library_is_rebuilt_not_used(tmp_path):
    lib = _cached_copy(tmp_path)
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0x01
    lib.write_bytes(bytes(data))
    r = run_python(_USE_KERNELS, SEMISPARSE_CACHE=str(tmp_path))
    assert r.returncode == 0 and "OK" in r.stdout, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert kernels.build._verified(lib) and lib.read_bytes() != bytes(data)


# ---------------------------------------------------------------------------------------------------------
# the kernels built with AddressSanitizer: every read and write inside the buffers torch allocated


@pytest.fixture(scope="module")
def asan_cache(tmp_path_factory) -> Path:
    """One kernel cache for the sanitizer tests: each sanitized library (~8 s to compile) is built once."""
    return tmp_path_factory.mktemp("asan-cache")


def _asan_env(tmp_path: Path, cache: Path, variant: str) -> dict:
    """The environment of a process whose kernel library is ``variant`` built with AddressSanitizer (its
    runtime preloaded into Python, with libstdc++ so that C++ exceptions in torch's extensions still work)."""
    cc = kernels.build._compiler()
    libs = [subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
            for name in ("libasan.so", "libstdc++.so")] if cc else []
    if len(libs) != 2 or not all(os.path.isabs(lib) and os.path.exists(lib) for lib in libs):
        pytest.skip("the C compiler has no AddressSanitizer runtime")
    if variant not in kernels.runnable_variants() + kernels.emulated_variants():
        pytest.skip(f"{variant} does not run here (an emulated variant needs an AVX2 CPU and simde-py)")
    return {"SEMISPARSE_CACHE": str(cache), "SEMISPARSE_KERNEL_ISA": variant,
            "SEMISPARSE_KERNEL_CFLAGS": "-fsanitize=address -fno-omit-frame-pointer", "LD_PRELOAD": " ".join(libs),
            "ASAN_OPTIONS": f"detect_leaks=0:halt_on_error=1:log_path={tmp_path / 'asan'}"}


def _asan_reports(tmp_path: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in tmp_path.glob("asan*"))


# the AVX-512 code first (never run natively here before, checked on every run), the AVX2 code in the slow run
_ASAN_VARIANTS = ["avx512-emulated", "avx2"] if kernels.build._x86() else ["native"]


@needs_kernels
def test_address_sanitizer_build_reports_a_read_past_a_buffer(tmp_path, asan_cache):
    """The oracle of the test below works: a kernel handed a buffer one float short (behind the wrappers'
    checks) is stopped with an AddressSanitizer report."""
    env = _asan_env(tmp_path, asan_cache, _ASAN_VARIANTS[0])
    r = run_python("""
        import torch
        from semisparse.runtime.cpu import kernels
        lib = kernels.library()
        src, dst = torch.zeros(63), torch.zeros(64)  # an 8x8 transpose reads 64 floats
        lib.ss_transpose(src.data_ptr(), dst.data_ptr(), 8, 8, 8, 8)
        print("NOT CAUGHT")
    """, **env)
    assert r.returncode != 0 and "NOT CAUGHT" not in r.stdout, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "ERROR: AddressSanitizer" in _asan_reports(tmp_path)


@needs_kernels
@pytest.mark.parametrize("variant", [pytest.param(v, marks=() if i == 0 else pytest.mark.slow)
                                     for i, v in enumerate(_ASAN_VARIANTS)])
@pytest.mark.parametrize("scope", ["variant", pytest.param("runtime", marks=pytest.mark.slow)])
def test_kernels_read_and_write_only_inside_their_buffers_under_address_sanitizer(variant, scope, tmp_path,
                                                                                   asan_cache):
    """Kernel and deploy tests run again with the library built with AddressSanitizer, on the AVX2 code and
    on the AVX-512 code (emulated by SIMDe where the CPU lacks it): ``variant``, every entry point on shapes
    with tails and each kernel setting the planner may pick on deployed layers; ``runtime`` (slow), every
    runtime test."""
    env = _asan_env(tmp_path, asan_cache, variant)
    tests = (["tests/runtime/cpu/test_cpu_kernels.py", "-k", f"every_kernel_variant and {variant.split('-')[-1]}"]
             if scope == "variant" else ["tests/runtime", "--ignore", "tests/runtime/cpu/test_kernel_safety.py"])
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                        *tests], cwd=paths.ROOT, env={**os.environ, "PYTHONPATH": SRC, **env},
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and not _asan_reports(tmp_path), (r.stdout[-1500:], _asan_reports(tmp_path)[:3000])
    passed = r.stdout.strip().splitlines()[-1]
    assert " passed" in passed and (scope == "runtime" or passed.startswith("2 passed")), passed


# ---------------------------------------------------------------------------------------------------------
# graphs that cannot hold a ctypes call


def _small_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 10))
    ss.sparsify(m, 0.75)
    return m, torch.randn(1, 3, 8, 8)


def test_jit_trace_records_torch_ops_and_computes_the_model():
    """The ctypes calls are not in a trace: it used to replay uninitialised output buffers."""
    m, x = _small_model()
    dep = deploy(m, plan="condensed")
    with torch.no_grad():
        traced = torch.jit.trace(dep, x, check_trace=False)
        for xx in (x, torch.randn(1, 3, 8, 8)):
            torch.testing.assert_close(traced(xx), m.eval()(xx), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(traced(xx), dep(xx), rtol=1e-5, atol=1e-5)


def test_jit_script_of_a_condensed_layer_compiles_torchs_layer():
    m, x = _small_model()
    dep = deploy(m, plan="condensed")
    with torch.no_grad():
        for layer, inp in ((dep[0], x), (dep[4], torch.randn(2, 128))):
            scripted = torch.jit.script(layer)
            torch.testing.assert_close(scripted(inp), layer(inp), rtol=1e-5, atol=1e-5)


def test_jit_script_of_a_deployed_model_compiles_torchs_layers_and_leaves_the_model_as_it_is():
    """The thread hooks are Python TorchScript cannot compile: scripting a whole deployed model failed with a
    multi-line TorchScript error."""
    m, x = _small_model()
    dep = deploy(m, plan="condensed")
    before = [type(mod) for mod in dep.modules()]
    with torch.no_grad():
        scripted = torch.jit.script(dep)
        x2 = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(scripted(x2), m.eval()(x2), rtol=1e-5, atol=1e-5)
    assert [type(mod) for mod in dep.modules()] == before and dep._forward_pre_hooks  # dep keeps its layers


def test_jit_script_of_a_deployed_model_with_layers_kept_dense():
    """A layer the planner keeps dense is torch's own layer carrying its report row; TorchScript failed on that
    row's class annotation ("Unknown type annotation: 'LayerReport'")."""
    m, x = _small_model()
    dep = deploy(m, plan="condensed")
    for name, layer in deployed_layers(dep):
        kept = as_torch_layer(layer)
        dep = replace_everywhere(dep, [name], kept)
    assert any(isinstance(mod, _KeptDense) for mod in dep.modules())
    with torch.no_grad():
        scripted = torch.jit.script(dep)
        x2 = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(scripted(x2), m.eval()(x2), rtol=1e-5, atol=1e-5)


def test_attention_traces_and_exports_with_torch_ops_and_refuses_script_in_one_line():
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    ss.sparsify(mha, 0.75)
    dep = deploy(mha, plan="condensed")
    x, x2 = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    with torch.no_grad():
        want = mha.eval()(x2, x2, x2, need_weights=False)[0]
        traced = torch.jit.trace(lambda q: dep(q, q, q, need_weights=False)[0], x, check_trace=False)
        torch.testing.assert_close(traced(x2), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(SemisparseError, match="torch.jit.script") as info:
        torch.jit.script(dep)
    assert "\n" not in str(info.value)


def test_torch_export_records_torch_ops_and_computes_the_model():
    m, x = _small_model()
    dep = deploy(m, plan="condensed")
    with torch.no_grad():
        prog = torch.export.export(dep, (x,))
        xx = torch.randn(1, 3, 8, 8)
        torch.testing.assert_close(prog.module()(xx), m.eval()(xx), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_runs_the_kernels_eagerly_and_is_exact():
    m, x = _small_model()
    dep = deploy(m, plan="condensed")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(dep)(x), m.eval()(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# NaN / Inf in inputs


def _pruned_linear(x: torch.Tensor, w: torch.Tensor, m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The pruned layer: each output sums its kept weights' products only."""
    return torch.where(m[None], w[None] * x[:, None, :], torch.zeros(())).sum(-1) + b


@pytest.mark.parametrize("with_kernels", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("constant_fan_in", [True, False])
def test_nan_and_inf_in_pruned_inputs_do_not_reach_condensed_linear_outputs(with_kernels, batch, constant_fan_in):
    if with_kernels and not kernels.available():
        pytest.skip("no C kernels")
    torch.manual_seed(4)
    lin = nn.Linear(16, 6)
    if constant_fan_in:
        m = torch.zeros(6, 16, dtype=torch.bool)
        for r in range(6):
            m[r, torch.randperm(15)[:4] + 1] = True
    else:
        m = torch.rand(6, 16) < 0.3
        m[:, 0] = False
        m[0, [3, 5, 9]] = True
        m[1, 7] = True  # a row with one kept weight: padded in the condensed form
        m[1, [c for c in range(16) if c != 7]] = False
    ss.sparsify(lin, None, masks={"weight": m})
    dep = deploy(lin, plan="condensed")
    x = torch.randn(batch, 16)
    x[:, 0] = float("nan")  # column 0: pruned everywhere
    pruned_everywhere = [c for c in range(16) if not bool(m[:, c].any())]
    for c in pruned_everywhere[1:3]:
        x[:, c] = float("inf")
    with (contextlib.nullcontext() if with_kernels else kernels_off()), torch.no_grad():
        y = dep(x)
    want = _pruned_linear(x, lin.weight.detach(), m, lin.bias.detach())
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    masked = F.linear(x, lin.weight.detach() * m, lin.bias.detach())
    assert bool(torch.isnan(masked).all())  # the masked dense product propagates the NaN to every output
    x[:, 7] = float("nan")  # an input some rows keep: NaN there, as in the pruned model
    with (contextlib.nullcontext() if with_kernels else kernels_off()), torch.no_grad():
        y = dep(x)
    want = _pruned_linear(x, lin.weight.detach(), m, lin.bias.detach())
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(torch.isnan(y), m[:, 7].expand(batch, 6))


@pytest.mark.parametrize("with_kernels", [True, False])
@pytest.mark.parametrize("n", [1, 2])
def test_nan_in_an_input_channel_a_conv_output_prunes_does_not_reach_it(with_kernels, n):
    if with_kernels and not kernels.available():
        pytest.skip("no C kernels")
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 5, 3, padding=1)
    m = torch.rand(5, 4, 3, 3) < 0.5
    m[:, 0] = False  # input channel 0 pruned by every output ...
    m[2, 0, 1, 1] = True  # ... except the centre tap of output 2
    m[:, 1, 0, 0] = True  # every output keeps something
    ss.sparsify(conv, None, masks={"weight": m})
    dep = deploy(conv, plan="condensed")
    x = torch.randn(n, 4, 6, 6)
    x[:, 0, 2, 3] = float("nan")
    x[:, 0, 4, 1] = float("inf")
    ctx = contextlib.nullcontext() if with_kernels else kernels_off()
    with ctx, torch.no_grad():
        y = dep(x)
    w = conv.weight.detach() * m
    clean = x.clone()
    clean[:, 0, 2, 3] = clean[:, 0, 4, 1] = 0.0
    want = F.conv2d(clean, w, conv.bias.detach(), padding=1)
    want[:, 2, 2, 3] = float("nan")  # output 2 keeps the centre tap of channel 0: it reads the NaN ...
    want[:, 2, 4, 1] = float("inf") if float(w[2, 0, 1, 1]) > 0 else float("-inf")  # ... and the Inf
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_padding_of_short_rows_points_at_a_kept_column():
    w = torch.randn(3, 10)
    m = torch.zeros(3, 10, dtype=torch.bool)
    m[0, [2, 4, 6, 8]] = True
    m[1, 9] = True
    m[2, [1, 5]] = True
    values, idx, orow = condense(w, m)
    for r in range(3):
        assert set(columns(idx)[r].tolist()) <= set(torch.nonzero(m[r]).flatten().tolist())
    assert values[1, 1:].abs().sum() == 0 and values[2, 2:].abs().sum() == 0


@pytest.mark.parametrize("n", [1, 2])
def test_loading_another_valid_layout_into_a_grouped_conv_runs_the_new_one(n):
    """Everything derived from orow (the group of each stored row) follows a load."""
    torch.manual_seed(7)
    convs, deps = [], []
    for ablated in (0, 3):  # output 0 (group 0) or output 3 (group 1) has no kept weight
        conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        m = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
        m[:, :, 1] = True
        m[ablated] = False
        ss.sparsify(conv, None, masks={"weight": m})
        convs.append(conv)
        deps.append(deploy(conv, plan="condensed"))
    x = torch.randn(n, 4, 6, 6)
    with torch.no_grad():
        deps[0](x)  # derive everything from the first layout
        deps[0].load_state_dict(deps[1].state_dict())
        torch.testing.assert_close(deps[0](x), convs[1].eval()(x), rtol=1e-5, atol=1e-5)
