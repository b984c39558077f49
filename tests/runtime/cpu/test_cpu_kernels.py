"""The compiled condensed kernels against their pure-torch reference (index arithmetic, tails, strides)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import semisparse as ss
from helpers.kernel_switch import kernels_of, kernels_off
from semisparse.errors import SemisparseError
from semisparse.runtime import deploy
from semisparse.runtime.cpu import kernels
from semisparse.runtime.cpu.layers import columns, condense, expand

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler: fast kernels unavailable")


def _problem(rows, K, k, seed=0, wide=False):
    g = torch.Generator().manual_seed(seed)
    idx = torch.sort(torch.rand(rows, K, generator=g).argsort(1)[:, :k], 1).values
    W = torch.randn(rows, k, generator=g)
    idx = idx.to(torch.int32) if wide else torch.where(idx >= 32768, idx - 65536, idx).to(torch.int16)
    return W.contiguous(), idx.contiguous()


@needs_kernels
@pytest.mark.parametrize("P", [1, 7, 8, 9, 31, 33, 63, 64, 65, 130])
@pytest.mark.parametrize("PB", [8, 16, 32, 64])
@pytest.mark.parametrize("wide", [False, True])
def test_spmm_matches_reference_for_every_tail(P, PB, wide):
    rows, K, k = 13, 40, 7
    W, idx = _problem(rows, K, k, wide=wide)
    npan = -(-P // PB)
    X = torch.randn(npan * K * PB + kernels.BLOCK)
    coff = torch.arange(K, dtype=torch.int64) * PB
    base = torch.zeros(rows, dtype=torch.int64)
    bias = torch.randn(rows)
    orow = torch.randperm(20)[:rows].sort().values
    got, want = torch.full((20, P), 7.0), torch.full((20, P), 7.0)
    off = kernels.offsets(idx, coff, base)
    kernels.spmm(X, W, off, bias, orow, got, P, P, PB, K * PB)
    kernels.spmm_reference(X, W, off, bias, orow, want, P, P, PB, K * PB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("P", [1, 8, 23, 24, 25, 47, 48, 49, 100])
@pytest.mark.parametrize("with_kernels", [True, False])
def test_spmm_rows4_matches_reference_for_every_tail(P, with_kernels):
    """Blocks of 4 rows with the same offsets, W in rows4 order: tiles of 24 positions (partial last tile),
    the batch-1-conv layout (one panel) and the Linear one (panels of 24), with and without the C library."""
    if with_kernels and not kernels.available():
        pytest.skip("no C compiler: fast kernels unavailable")
    W, idx = _problem(12, 40, 7, seed=P)
    idx = idx[::4].repeat_interleave(4, 0).contiguous()  # blocks of 4 rows keep the same inputs
    bias, orow = torch.randn(12), torch.randperm(20)[:12].sort().values
    for PB, panel in ((24, 40 * 24), (24, 24)):  # Linear panels; a conv plane read as one long panel
        coff = torch.arange(40, dtype=torch.int64) * (PB if panel != PB else 8)
        X = torch.randn(-(-P // PB) * panel + 40 * 8 + kernels.BLOCK)
        off = kernels.offsets(idx, coff, torch.zeros(12, dtype=torch.int64))
        want, got = torch.full((20, P), 7.0), torch.full((20, P), 7.0)
        kernels.spmm_reference(X, W, off, bias, orow, want, P, P, PB, panel)
        with contextlib.nullcontext() if with_kernels else kernels_off():
            kernels.spmm(X, kernels.rows4_values(W), off, bias, orow, got, P, P, PB, panel, rows4=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # positions contiguous, each block's 4 output rows adjacent (a Linear's (B, out) output, no transpose)
    orow_t = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19])
    X = torch.randn(-(-P // 24) * 40 * 24 + kernels.BLOCK)
    off = kernels.offsets(idx, torch.arange(40, dtype=torch.int64) * 24, torch.zeros(12, dtype=torch.int64))
    want, got = torch.full((P, 21), 7.0), torch.full((P, 21), 7.0)
    kernels.spmm_reference(X, W, off, bias, orow_t, want, P, 1, 24, 40 * 24, ldp=21)
    with contextlib.nullcontext() if with_kernels else kernels_off():
        kernels.spmm(X, kernels.rows4_values(W), off, bias, orow_t, got, P, 1, 24, 40 * 24, ldp=21, rows4=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="each block's 4 output rows adjacent"):  # rows 4 and 6 apart
        kernels.spmm(X, W, off, bias, orow, got, P, 1, 24, 40 * 24, ldp=21, rows4=True)
    with pytest.raises(ValueError, match="rows4 needs PB 24"):
        kernels.spmm(X, W, off, bias, orow, got, P, P, 32, panel, rows4=True)
    off_rows = kernels.offsets(_problem(12, 40, 7, seed=1)[1], torch.arange(40, dtype=torch.int64) * 24,
                               torch.zeros(12, dtype=torch.int64))  # rows that read different inputs
    with pytest.raises(ValueError, match="rows in blocks of 4 with the same offsets"):
        kernels.spmm(X, W, off_rows, bias, orow, got, P, P, 24, 40 * 24, rows4=True)


@needs_kernels
@pytest.mark.parametrize("P", [33, 40, 41, 48, 49, 56, 57, 113])
@pytest.mark.parametrize("PB", [40, 48, 56, 64])
def test_spmm_narrow_rows_write_only_their_positions(P, PB):
    """Blocks of 33-56 positions (a 7x7 plane's 49) run 5-7 vectors instead of 8: the same sums as the
    reference, in both output layouts, and nothing written past a block's positions."""
    rows, K, k = 11, 30, 9
    W, idx = _problem(rows, K, k, seed=5)
    X = torch.randn(-(-P // PB) * K * PB + kernels.BLOCK)
    off = kernels.offsets(idx, torch.arange(K, dtype=torch.int64) * PB, torch.zeros(rows, dtype=torch.int64))
    bias, orow = torch.randn(rows), torch.arange(rows)
    for ldp in (1, rows):
        ldy = P + 3 if ldp == 1 else 1  # three sentinel columns after each row's P positions
        got = torch.full((rows * (P + 3),), 7.0)
        want = got.clone()
        kernels.spmm(X, W, off, bias, orow, got, P, ldy, PB, K * PB, ldp=ldp)
        kernels.spmm_reference(X, W, off, bias, orow, want, P, ldy, PB, K * PB, ldp=ldp)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if ldp == 1:
            assert bool((got.view(rows, P + 3)[:, P:] == 7.0).all())


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 7])
@pytest.mark.parametrize("P", [5, 32, 45, 200])
def test_spmm_row_pairs_match_reference(rows, P):
    K, k, PB = 40, 6, 32
    W, idx = _problem(rows, K, k, seed=3)
    X = torch.randn(-(-P // PB) * K * PB + kernels.BLOCK)
    off = kernels.offsets(idx, torch.arange(K, dtype=torch.int64) * PB, torch.zeros(rows, dtype=torch.int64))
    bias, orow = torch.randn(rows), torch.arange(rows)
    for ldp in (1, rows):
        ldy = P if ldp == 1 else 1
        got, want = torch.zeros(rows * P), torch.zeros(rows * P)
        kernels.spmm(X, W, off, bias, orow, got, P, ldy, PB, K * PB, ldp=ldp, pairs=True)
        kernels.spmm_reference(X, W, off, bias, orow, want, P, ldy, PB, K * PB, ldp=ldp)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_spmm_position_stride_writes_transposed_output():
    rows, K, k, P, PB = 9, 24, 5, 70, 32
    W, idx = _problem(rows, K, k, seed=1)
    X = torch.randn(-(-P // PB) * K * PB + kernels.BLOCK)
    coff = torch.arange(K, dtype=torch.int64) * PB
    base = torch.zeros(rows, dtype=torch.int64)
    orow = torch.arange(rows)
    got, want = torch.zeros(P, rows), torch.zeros(P, rows)
    off = kernels.offsets(idx, coff, base)
    kernels.spmm(X, W, off, None, orow, got, P, 1, PB, K * PB, ldp=rows)
    kernels.spmm_reference(X, W, off, None, orow, want, P, 1, PB, K * PB, ldp=rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("variant", kernels.GEMV_VARIANTS)
@pytest.mark.parametrize("K,k,wide", [(50, 3, False), (300, 37, False), (40_000, 61, False), (300, 40, True)])
def test_gemv_matches_reference(variant, K, k, wide):
    rows = 21
    W, idx = _problem(rows, K, k, seed=2, wide=wide)
    x = torch.randn(K)
    bias = torch.randn(rows)
    orow = torch.arange(rows) * 2
    got, want = torch.zeros(2 * rows), torch.zeros(2 * rows)
    kernels.gemv(x, W, idx, bias, orow, got, variant)
    kernels.gemv_reference(x, W, idx, bias, orow, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_offsets_resolve_base_and_column_table():
    idx = torch.tensor([[0, 3], [1, 2]], dtype=torch.int16)
    coff = torch.tensor([10, 20, 30, 40])
    base = torch.tensor([0, 1000])
    assert kernels.offsets(idx, coff, base).tolist() == [[10, 40], [1020, 1030]]
    assert kernels.offsets(idx, coff, base).dtype == torch.int32
    with pytest.raises(ValueError, match="int32"):
        kernels.offsets(idx, coff * 2**30, base)


def test_pack_panels_layout_and_zero_padding():
    x = torch.randn(5, 7)
    out = kernels.pack_panels(x, 4)
    panels = out[: 2 * 7 * 4].view(2, 7, 4)
    torch.testing.assert_close(panels[0].t(), x[:4])
    torch.testing.assert_close(panels[1].t()[:1], x[4:])
    assert bool((panels[1].t()[1:] == 0).all())


def test_condense_reads_mask_not_zeros():
    w = torch.randn(4, 10)
    m = torch.zeros(4, 10, dtype=torch.bool)
    m[0, [1, 5, 7]] = True
    m[2, [0, 2, 9]] = True
    w[0, 5] = 0.0  # a kept weight that is exactly zero stays stored
    values, idx, orow = condense(w, m)
    assert orow.tolist() == [0, 2]  # rows 1 and 3 are ablated: not stored
    assert values.shape == (2, 3)
    assert columns(idx).tolist() == [[1, 5, 7], [0, 2, 9]]
    torch.testing.assert_close(expand(values, idx, orow, (4, 10)), w * m)


def test_condense_pads_rows_with_fewer_kept_weights():
    w = torch.randn(3, 8)
    m = torch.zeros(3, 8, dtype=torch.bool)
    m[0, :4] = True
    m[1, 2] = True
    m[2, [3, 6]] = True
    values, idx, orow = condense(w, m)
    assert values.shape == (3, 4)
    torch.testing.assert_close(expand(values, idx, orow, (3, 8)), w * m)


def test_index_width_uint16_until_65536_then_int32():
    for K, dtype in ((1000, torch.int16), (65_536, torch.int16), (65_537, torch.int32)):
        w = torch.randn(2, K)
        m = torch.zeros(2, K, dtype=torch.bool)
        m[:, [0, K // 2, K - 1]] = True
        values, idx, orow = condense(w, m)
        assert idx.dtype == dtype
        assert columns(idx)[0].tolist() == [0, K // 2, K - 1]


def test_reference_fallback_is_used_when_kernels_are_unavailable(monkeypatch):
    monkeypatch.setattr(kernels.build, "library", lambda: None)
    W, idx = _problem(6, 30, 4)
    x = torch.randn(30)
    orow = torch.arange(6)
    got = torch.zeros(6)
    kernels.gemv(x, W, idx, None, orow, got)
    want = (W * x[columns(idx)]).sum(1)
    torch.testing.assert_close(got, want)


@needs_kernels
def test_kernel_pool_follows_torch_threads_in_any_python_thread():
    import threading

    before = torch.get_num_threads()
    seen = []
    W, idx = _problem(4, 30, 3)

    x, orow, y = torch.randn(30), torch.arange(4), torch.zeros(4)

    def work():
        kernels.library().ss_sync_threads(2)  # this thread's OpenMP setting differs from torch's
        kernels.gemv(x, W, idx, None, orow, y)  # no torch op in between (torch would re-sync it itself)
        seen.append(kernels.library().ss_max_threads())

    try:
        torch.set_num_threads(1)
        t = threading.Thread(target=work)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [1]  # the kernels follow torch.get_num_threads(), whatever OpenMP was told before


@needs_kernels
@pytest.mark.parametrize("P", [1, 9, 16, 17, 31, 32, 33, 63, 64, 65, 130])
@pytest.mark.parametrize("PB", [32, 64])
@pytest.mark.parametrize("per_tile", [1, 3, 40])
def test_tiled_spmm_matches_reference_with_no_slack(P, PB, per_tile):
    """Channel tiles (empty ones included), short last blocks read through masked loads: X is sized exactly."""
    rows, K, k = 11, 40, 7
    W, idx = _problem(rows, K, k, seed=P)
    npan = -(-P // PB)
    X = torch.randn(npan * K * PB)  # no slack past the last panel
    off = kernels.offsets(idx, torch.arange(K, dtype=torch.int64) * PB, torch.zeros(rows, dtype=torch.int64))
    Ws, offs, seg = kernels.tile(W, off, columns(idx), per_tile)
    assert seg.shape[0] == rows and bool((seg[:, 1:] >= seg[:, :-1]).all())
    assert torch.equal(seg[:, -1], torch.full((rows,), k, dtype=torch.int32))
    bias, orow = torch.randn(rows), torch.randperm(20)[:rows].sort().values
    got, want = torch.full((20, P), 7.0), torch.full((20, P), 7.0)
    kernels.spmm_tiled(X, Ws, offs, seg, bias, orow, got, P, P, PB, K * PB)
    kernels.spmm_reference(X, W, off, bias, orow, want, P, P, PB, K * PB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # transposed output (position stride = rows), no bias
    got, want = torch.zeros(P, rows), torch.zeros(P, rows)
    kernels.spmm_tiled(X, Ws, offs, seg, None, torch.arange(rows), got, P, 1, PB, K * PB, ldp=rows)
    kernels.spmm_reference(X, W, off, None, torch.arange(rows), want, P, 1, PB, K * PB, ldp=rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tile_sorts_rows_and_cuts_them_by_channel():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    off = torch.tensor([[30, 10, 20, 0]], dtype=torch.int32)
    channel = torch.tensor([[3, 1, 2, 0]])
    Ws, offs, seg = kernels.tile(W, off, channel, 2)
    assert offs.tolist() == [[0, 10, 20, 30]] and Ws.tolist() == [[4.0, 2.0, 3.0, 1.0]]
    assert seg.tolist() == [[0, 2, 4]]


@needs_kernels
def test_fill_rows_writes_only_the_given_rows():
    Y = torch.zeros(6, 10)
    kernels.fill_rows(Y, torch.tensor([1, 4]), torch.tensor([2.5, -1.0]), 10, 10, 1)
    assert torch.equal(Y[1], torch.full((10,), 2.5)) and torch.equal(Y[4], torch.full((10,), -1.0))
    assert Y[[0, 2, 3, 5]].abs().sum() == 0
    Yt = torch.zeros(3, 6)  # (batch, features): rows are feature columns
    kernels.fill_rows(Yt, torch.tensor([2]), torch.tensor([7.0]), 1, 3, 6)
    assert torch.equal(Yt[:, 2], torch.full((3,), 7.0)) and Yt[:, [0, 1, 3, 4, 5]].abs().sum() == 0


def test_fill_rows_reference_path_matches(monkeypatch):
    monkeypatch.setattr(kernels.build, "library", lambda: None)
    Yt = torch.zeros(3, 6)
    kernels.fill_rows(Yt, torch.tensor([2, 5]), torch.tensor([7.0, 1.0]), 1, 3, 6)
    assert torch.equal(Yt[:, 2], torch.full((3,), 7.0)) and torch.equal(Yt[:, 5], torch.ones(3))
    assert Yt[:, :2].abs().sum() == 0


def test_threads_split_rows_when_position_blocks_would_leave_a_thread_idle():
    assert kernels.split_by_blocks(196, 64, 256, 2) == 0  # blocks 64,64 | 64,4: one thread idles
    assert kernels.split_by_blocks(784, 64, 256, 2) == 0  # 13 blocks, 7 : 6 (14% more for one thread)
    assert kernels.split_by_blocks(1024, 64, 256, 2) == 1  # 16 blocks, 8 : 8
    assert kernels.split_by_blocks(256, 64, 256, 2) == 1  # 2 : 2 full blocks
    assert kernels.split_by_blocks(196, 64, 1, 2) == 1  # one row: only blocks can be shared
    assert kernels.split_by_blocks(49, 64, 512, 1) == 1  # one thread: either way
    assert kernels.split_by_blocks(197, 64, 768, 2, prefer_blocks=True) == 1  # Linear panels
    assert kernels.split_by_blocks(40, 64, 768, 2, prefer_blocks=True) == 0  # one panel: rows


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (8, 8), (13, 77), (64, 64), (130, 67), (197, 300)])
def test_transpose_and_panel_packing_are_exact(shape):
    x = torch.randn(*shape)
    assert torch.equal(kernels.transpose(x), x.t())
    B, K = shape
    for PB in (8, 32, 64):
        npan = -(-B // PB)
        want = torch.zeros(npan * PB, K)
        want[:B] = x
        got = kernels.pack_panels(x, PB)
        assert torch.equal(got[: npan * K * PB].view(npan, K, PB), want.view(npan, PB, K).transpose(1, 2))


# ---------------------------------------------------------------------------------------------------------
# instruction-set variants


def _variant_params():
    names = [*kernels.VARIANTS, *kernels.EMULATED] if kernels.build._x86() else ["native"]
    runnable = kernels.runnable_variants() + kernels.emulated_variants()
    # a variant this CPU cannot run is only compiled (slow: a compiler run)
    return [pytest.param(v, marks=() if v in runnable else pytest.mark.slow) for v in names]


def _variant_library(variant, tmp_path):
    """The library of ``variant``; a variant this CPU cannot run is compiled, then the test skips."""
    if variant in kernels.EMULATED and variant not in kernels.emulated_variants():
        pytest.skip(f"{variant} needs an AVX2 CPU and the simde-py package")
    if variant not in kernels.runnable_variants() + kernels.emulated_variants():  # compiles here, runs elsewhere
        built = kernels.build._compile(kernels.build._compiler(), tmp_path / "variant.so", variant)
        assert built.stat().st_size > 0
        pytest.skip(f"{variant} compiled; this CPU cannot run it")
    lib = kernels.variant_library(variant)
    if variant != "native":
        assert lib.ss_simd() == kernels.VARIANT_BITS[variant]
    return lib


@needs_kernels
@pytest.mark.parametrize("variant", _variant_params())
def test_every_kernel_variant_equals_the_reference_on_shapes_with_tails(variant, monkeypatch, tmp_path):
    lib = _variant_library(variant, tmp_path)
    monkeypatch.setattr(kernels.build, "library", lambda: lib)
    rows, K, k = 13, 40, 7
    for P, PB in ((1, 8), (9, 16), (33, 32), (63, 64), (64, 64), (65, 64), (130, 64), (45, 32)):
        W, idx = _problem(rows, K, k, seed=P)
        X = torch.randn(-(-P // PB) * K * PB + kernels.BLOCK)
        off = kernels.offsets(idx, torch.arange(K, dtype=torch.int64) * PB, torch.zeros(rows, dtype=torch.int64))
        bias, orow = torch.randn(rows), torch.randperm(20)[:rows].sort().values
        want = torch.full((20, P), 7.0)
        kernels.spmm_reference(X, W, off, bias, orow, want, P, P, PB, K * PB)
        for ldp in (1, 20):  # contiguous rows, and strided (transposed) output
            got = torch.full((20, P), 7.0) if ldp == 1 else torch.full((P, 20), 7.0)
            kernels.spmm(X, W, off, bias, orow, got, P, P if ldp == 1 else 1, PB, K * PB, ldp=ldp)
            torch.testing.assert_close(got if ldp == 1 else got.t(), want, rtol=1e-5, atol=1e-5)
        if PB == 32:
            got = torch.full((20, P), 7.0)
            kernels.spmm(X, W, off, bias, orow, got, P, P, PB, K * PB, pairs=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if PB in (32, 64):
            Ws, offs, seg = kernels.tile(W, off, columns(idx), 3)
            got = torch.full((20, P), 7.0)
            kernels.spmm_tiled(X, Ws, offs, seg, bias, orow, got, P, P, PB, K * PB)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for kk, wide in ((3, False), (17, False), (37, True), (61, False), (100, True)):
        W, idx = _problem(21, 300, kk, seed=kk, wide=wide)
        x, bias, orow = torch.randn(300), torch.randn(21), torch.arange(21) * 2
        want = torch.zeros(42)
        kernels.gemv_reference(x, W, idx, bias, orow, want)
        want16 = torch.zeros(42)
        kernels.gemv_reference(x, W.bfloat16().float(), idx, bias, orow, want16)
        for gv in kernels.GEMV_VARIANTS:
            for w, ref in ((W, want), (W.bfloat16(), want16)):
                got = torch.zeros(42)
                kernels.gemv(x, w, idx, bias, orow, got, gv)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("variant", _variant_params())
def test_every_kernel_variant_deploys_layers_equal_to_the_masked_model(variant, tmp_path):
    """Deployed layers run by each variant (the AVX-512 one emulated where the CPU lacks it) against torch:
    conv geometries with every kernel setting the planner may pick, batch 1 and 3, ablated channels, rows4;
    the batch-1 Linear with each gather, fp32 and bf16 values; max pooling."""
    lib = _variant_library(variant, tmp_path)
    g = torch.Generator().manual_seed(7)
    with kernels_of(lib), torch.no_grad():
        for cin, cout, k, stride, pad, dil, groups, hw in ((16, 24, 3, 1, 1, 1, 1, 15), (8, 20, 1, 2, 0, 1, 1, 17),
                                                          (12, 12, 3, 2, 1, 2, 4, 11), (3, 70, 7, 2, 3, 1, 1, 23),
                                                          (16, 24, 1, 1, 0, 1, 1, 18)):  # 18x16: x in place at PB 32
            conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups)
            mask = torch.rand(conv.weight.shape, generator=g) < 0.4
            mask[: cout // 4] = False  # ablated output channels
            ss.sparsify(conv, None, masks={"weight": mask})
            dep = deploy(conv, plan="condensed")
            for n in (1, 3):
                x = torch.randn(n, cin, hw, hw - 2, generator=g)
                for setting in dep.variants(x):
                    dep.use_variant(setting)
                    torch.testing.assert_close(dep(x), conv(x), rtol=1e-5, atol=1e-5)
        lin = nn.Linear(48, 40)  # rows in blocks of 4 sharing their inputs: the rows4 setting, Linear and conv
        ss.sparsify(lin, "2:4", shared_rows=4)
        dep = deploy(lin, plan="condensed")
        x = torch.randn(30, 48, generator=g)
        dep.use_variant(dep.variants(x)[-1])
        torch.testing.assert_close(dep(x), lin(x), rtol=1e-5, atol=1e-5)
        for k, stride, hw in ((3, 1, 13), (3, 2, 23), (1, 1, 12)):  # 1x1 at 12x8: x read in place, no copy
            conv = nn.Conv2d(16, 24, k, stride=stride, padding=k // 2)
            ss.sparsify(conv, "2:4", shared_rows=4)
            dep = deploy(conv, plan="condensed")
            x = torch.randn(1, 16, hw, hw - 4, generator=g)
            assert dep.variants(x)[-1]["rows4"]
            dep.use_variant(dep.variants(x)[-1])
            torch.testing.assert_close(dep(x), conv(x), rtol=1e-5, atol=1e-5)
        for width, dtype, tol in ((300, torch.float32, 1e-5), (70_000, torch.float32, 1e-5),
                                  (300, torch.bfloat16, 2e-2)):
            lin = nn.Linear(width, 37)
            ss.sparsify(lin, 0.8)
            dep = deploy(lin, plan="condensed", dtype=dtype)
            x = torch.randn(1, width, generator=g)
            for gv in kernels.GEMV_VARIANTS:
                dep.use_variant({"gemv_variant": gv})
                torch.testing.assert_close(dep(x.to(dtype)).float(), lin(x), rtol=tol, atol=tol)
        pool = nn.MaxPool2d(3, stride=2, padding=1)
        x = torch.randn(1, 16, 33, 31, generator=g)
        want = pool(x)
        assert torch.equal(kernels.maxpool2d(x, (3, 3), (2, 2), (1, 1), tuple(want.shape[-2:])), want)


def test_variant_choice_follows_the_cpu_and_the_environment(monkeypatch):
    if not kernels.build._x86():
        pytest.skip("variants are x86-64 builds")
    zen3 = "flags : fpu sse2 avx avx2 fma bmi2"
    xeon = zen3 + " avx512f avx512dq avx512vl avx512bw avx512_bf16 amx_tile"
    old = "flags : fpu sse2 sse4_2"
    monkeypatch.delenv("SEMISPARSE_KERNEL_ISA", raising=False)
    assert [kernels.chosen_variant(f) for f in (old, zen3, xeon)] == ["generic", "avx2", "avx512"]
    assert kernels.runnable_variants(xeon) == ["generic", "avx2", "avx512"]
    monkeypatch.setenv("SEMISPARSE_KERNEL_ISA", "AVX2")
    assert kernels.chosen_variant(xeon) == "avx2"
    monkeypatch.setenv("SEMISPARSE_KERNEL_ISA", "avx512")
    with pytest.raises(SemisparseError, match="cannot run it") as info:
        kernels.chosen_variant(zen3)
    assert "\n" not in str(info.value)
    monkeypatch.setenv("SEMISPARSE_KERNEL_ISA", "sse9")
    with pytest.raises(SemisparseError, match="must be one of generic, avx2, avx512, avx512-emulated"):
        kernels.chosen_variant(zen3)
    monkeypatch.setenv("SEMISPARSE_KERNEL_ISA", "avx512-emulated")  # asked for by name only, never chosen
    if kernels.emulated_variants(zen3):
        assert kernels.chosen_variant(zen3) == "avx512-emulated"
    with pytest.raises(SemisparseError, match="needs an AVX2 CPU and the simde-py package"):
        kernels.chosen_variant(old)
    monkeypatch.delenv("SEMISPARSE_KERNEL_ISA")
    assert kernels.chosen_variant(xeon) == "avx512" and kernels.chosen_variant(zen3) == "avx2"


@needs_kernels
def test_a_forced_variant_is_the_one_loaded(monkeypatch):
    for name in ("_lib", "_path", "_variant", "_tried", "_why_not"):  # a fresh load, undone after the test
        monkeypatch.setattr(kernels.build, name, getattr(kernels.build, name))
    for want in kernels.runnable_variants() + kernels.emulated_variants():
        monkeypatch.setenv("SEMISPARSE_KERNEL_ISA", want)
        monkeypatch.setattr(kernels.build, "_tried", False)
        assert kernels.loaded_variant() == want and kernels.library().ss_simd() == kernels.VARIANT_BITS[want]
    if kernels.build._x86() and "avx512" not in kernels.runnable_variants():
        monkeypatch.setenv("SEMISPARSE_KERNEL_ISA", "avx512")
        monkeypatch.setattr(kernels.build, "_tried", False)
        with pytest.raises(SemisparseError, match="cannot run it"):
            kernels.available()


@needs_kernels
@pytest.mark.parametrize("variant", kernels.GEMV_VARIANTS)
@pytest.mark.parametrize("k,wide", [(3, False), (17, False), (37, True), (61, False), (100, True)])
def test_bf16_gemv_reads_bf16_values_and_sums_in_fp32(variant, k, wide):
    W, idx = _problem(21, 300, k, seed=k, wide=wide)
    Wb = W.bfloat16()
    x, bias, orow = torch.randn(300), torch.randn(21), torch.arange(21) * 2
    got, want = torch.zeros(42), torch.zeros(42)
    kernels.gemv(x, Wb, idx, bias, orow, got, variant)
    kernels.gemv_reference(x, Wb.float(), idx, bias, orow, want)  # the bf16 weights, exactly, in fp32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
