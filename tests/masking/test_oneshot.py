"""Calibrated one-shot masks (SparseGPT-style reconstruction, Wanda) against independent references."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import semisparse as ss
from helpers.oneshot_net import calibration_batches, oneshot_net
from semisparse.layout import Layout
from semisparse.masking import sparse_weights
from semisparse.masking.obs import column_sweep
from semisparse.patterns import NM


def _block_sums(score: np.ndarray, shared: int) -> np.ndarray:
    """Each row's scores replaced by their sum over its block of ``shared`` rows (the last may be shorter)."""
    out = score.copy()
    for start in range(0, len(score), shared):
        out[start:start + shared] = score[start:start + shared].sum(0)
    return out


def obs_reference(w: np.ndarray, h: np.ndarray, target, damp: float = 0.01, block: int | None = None,
                  shared: int = 1):
    """SparseGPT's sweep written out: a fresh inverse of H[i:, i:] at every column, one row at a time.
    ``shared``: the saliency summed over blocks of that many rows before each row picks its columns."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    rows, k = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    keep = np.ones_like(w, dtype=bool)
    block = block or k
    for i in range(k):
        inv = np.linalg.inv(h[i:, i:])
        if isinstance(target, NM) and i % target.m == 0:
            diag = [np.linalg.inv(h[j:, j:])[0, 0] for j in range(i, i + target.m)]
            scores = _block_sums(w[:, i:i + target.m] ** 2 / np.array(diag), shared)  # OBS saliency w^2 / [inv H]_qq
            for r in range(rows):
                for j in np.argsort(scores[r], kind="stable")[: target.m - target.n]:
                    keep[r, i + j] = False
        if not isinstance(target, NM) and i % block == 0:
            stop = min(i + block, k)
            count = round(stop * (k - target) / k) - round(i * (k - target) / k)
            diag = [np.linalg.inv(h[j:, j:])[0, 0] for j in range(i, stop)]
            scores = _block_sums(w[:, i:stop] ** 2 / np.array(diag), shared)
            for r in range(rows):
                for j in np.argsort(scores[r], kind="stable")[:count]:
                    keep[r, i + j] = False
        for r in range(rows):
            if not keep[r, i]:
                w[r, i:] -= w[r, i] / inv[0, 0] * inv[0, :]
                w[r, i] = 0.0
    return w, keep


def _hessian(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64)
    x = torch.randn(200, k, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    x[:, 3] = 0  # a dead input
    return x.T @ x / 200


@pytest.mark.parametrize("target", [NM(2, 4), NM(1, 4), NM(3, 8), 5], ids=str)
@pytest.mark.parametrize("blocksize", [4, 8, 128])
def test_column_sweep_equals_explicit_obs_with_a_fresh_inverse_per_step(target, blocksize):
    torch.manual_seed(0)
    w = torch.randn(6, 16, dtype=torch.float64)
    h = _hessian(16, 1)
    if isinstance(target, int) and blocksize < 16:
        blocksize_ref = blocksize
    else:
        blocksize_ref = None if isinstance(target, NM) else max(blocksize, 16)
    got_w, got_mask = column_sweep(w, h, target, blocksize=blocksize)
    ref_w, ref_mask = obs_reference(w.numpy(), h.numpy(), target, block=blocksize_ref)
    assert np.array_equal(got_mask.numpy(), ref_mask)
    np.testing.assert_allclose(got_w.numpy(), ref_w, rtol=1e-9, atol=1e-9)
    assert bool((got_w[~got_mask] == 0).all())
    if isinstance(target, NM):
        assert bool((got_mask.reshape(6, -1, target.m).sum(-1) == target.n).all())
    else:
        assert bool((got_mask.sum(1) == target).all())


@pytest.mark.parametrize("target", [NM(2, 4), NM(1, 4), 5], ids=str)
@pytest.mark.parametrize("blocksize", [4, 128])
@pytest.mark.parametrize("rows", [8, 10])
def test_column_sweep_with_shared_rows_equals_explicit_obs_with_summed_saliency(target, blocksize, rows):
    """Blocks of 4 rows (10 rows: the last block has 2) prune the same columns; each row is still N:M / k."""
    torch.manual_seed(0)
    w = torch.randn(rows, 16, dtype=torch.float64)
    h = _hessian(16, 1)
    got_w, got_mask = column_sweep(w, h, target, blocksize=blocksize, shared_rows=4)
    block_ref = blocksize if not isinstance(target, NM) and blocksize < 16 else None
    ref_w, ref_mask = obs_reference(w.numpy(), h.numpy(), target, block=block_ref, shared=4)
    assert np.array_equal(got_mask.numpy(), ref_mask)
    np.testing.assert_allclose(got_w.numpy(), ref_w, rtol=1e-9, atol=1e-9)
    for start in range(0, rows, 4):
        assert bool((got_mask[start:start + 4] == got_mask[start]).all())
    if isinstance(target, NM):
        assert bool((got_mask.reshape(rows, -1, target.m).sum(-1) == target.n).all())
    else:
        assert bool((got_mask.sum(1) == target).all())
    per_row_mask = column_sweep(w, h, target, blocksize=blocksize)[1]
    assert not torch.equal(per_row_mask, got_mask)  # sharing changed the choice (the test sees a difference)
    assert torch.equal(column_sweep(w, h, target, blocksize=blocksize, shared_rows=1)[1], per_row_mask)


def _counts_ok(model: nn.Module, pattern) -> None:
    """Every mask checked by hand on its layout's view (padded taps keep min(N, real) real weights)."""
    for sw in sparse_weights(model):
        mask = sw.parametrization.hard_mask()
        lay: Layout = sw.parametrization.layout
        if isinstance(pattern, NM):
            view = lay.to_view(mask, pattern.m, fill=False) if lay.mode == "taps" else lay.to_view(mask)
            real = lay.to_view(torch.ones_like(mask), pattern.m, fill=False) if lay.mode == "taps" else None
            counts = view.reshape(view.shape[0], -1, pattern.m).sum(-1)
            want = (real.reshape(view.shape[0], -1, pattern.m).sum(-1).clamp(max=pattern.n)
                    if real is not None else torch.full_like(counts, pattern.n))
            assert torch.equal(counts, want), sw.key
        else:
            view = lay.to_view(mask)
            assert bool((view.sum(1) == pattern.k(view.shape[1])).all()), sw.key


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", 0.75], ids=str)
def test_calibrated_masks_are_exactly_the_pattern_on_every_layer_kind(method, pattern):
    model = oneshot_net()
    rep = ss.sparsify(model, pattern, method=method, calibration=calibration_batches(), pad=True)
    pat = ss.parse_pattern(pattern)
    assert len(rep.sparse_layers) == (4 if pattern == "2:8" else 5)  # 2:8: the last Linear has 12 inputs
    _counts_ok(model, pat)
    ss.check(model)
    assert all(r.extra["method"] == method and 0 <= r.extra["rel_err"] < 1.5 for r in rep.sparse_layers)
    assert "rel_err" in str(ss.report(model))
    with torch.no_grad():
        assert torch.isfinite(model(calibration_batches(1)[0])).all()


def test_multihead_attention_packed_qkv_and_out_projection_are_calibrated():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(3, 5, 16)
    dense = copy.deepcopy(mha)
    rep = ss.sparsify(mha, "2:4", method="sparsegpt", calibration=[(x, x, x)])
    assert {r.name for r in rep.sparse_layers} == {"in_proj_weight", "out_proj.weight"}
    ss.check(mha)
    mha.eval()
    dense.eval()
    with torch.no_grad():
        got = mha(x, x, x, need_weights=False)[0]
        ref = dense(x, x, x, need_weights=False)[0]
        mag = copy.deepcopy(dense)
        ss.sparsify(mag, "2:4")
        worse = mag(x, x, x, need_weights=False)[0]
    assert (got - ref).norm() < (worse - ref).norm()


def test_layers_are_pruned_in_forward_order_on_the_pruned_outputs_before_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    w1, w2 = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    b1 = model[0].bias.detach().clone()
    x = torch.randn(64, 8) @ torch.randn(8, 8)
    ss.sparsify(model, "2:4", method="sparsegpt", calibration=[x[:32], x[32:]])
    h1 = (x.T @ x / 64).double()
    ref1, mask1 = column_sweep(w1.double(), h1, NM(2, 4))
    y = x @ ref1.float().T + b1  # what layer 2 sees: the pruned layer 1's output
    ref2, mask2 = column_sweep(w2.double(), (y.T @ y / 64).double(), NM(2, 4))
    masks = ss.masks(model)
    assert torch.equal(masks["0.weight"], mask1) and torch.equal(masks["1.weight"], mask2)
    torch.testing.assert_close(model[0].weight, ref1.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].weight, ref2.float(), rtol=1e-4, atol=1e-5)
    # original: reconstructed where kept, the dense weights where pruned
    orig = model[0].parametrizations.weight.original
    assert torch.equal(orig[~mask1], w1[~mask1])


def test_report_relative_error_is_the_output_error_on_the_calibration_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    dense_w = model[0].weight.detach().clone()
    x = torch.randn(40, 16)
    rep = ss.sparsify(model, "2:4", method="wanda", calibration=[x])
    w = model[0].weight.detach()
    want = float((x @ (dense_w - w).T).norm() / (x @ dense_w.T).norm())
    assert rep.layers[0].extra["rel_err"] == pytest.approx(want, rel=1e-4)


def test_sparsegpt_beats_magnitude_and_wanda_on_correlated_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    x = torch.randn(256, 32) @ torch.randn(32, 32)
    errs = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        m = copy.deepcopy(model)
        kw = {} if method == "magnitude" else {"calibration": [x]}
        ss.sparsify(m, "2:4", method=method, **kw)
        with torch.no_grad():
            errs[method] = float((m(x) - model(x)).norm())
    assert errs["sparsegpt"] < 0.8 * min(errs["wanda"], errs["magnitude"])


class KwNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, image: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = self.a(image)
        return self.b(h if scale is None else h * scale)


def test_calibration_in_every_form_gives_the_same_masks():
    torch.manual_seed(0)
    base = KwNet()
    xs = [torch.randn(8, 8) for _ in range(3)]
    ys = [torch.zeros(8, dtype=torch.long) for _ in range(3)]
    one = torch.ones(1)
    dataset = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    forms = {
        "tensors": dict(calibration=xs),
        "tuples": dict(calibration=[(x,) for x in xs]),
        "tuples with a second input": dict(calibration=[(x, one) for x in xs]),
        "dicts": dict(calibration=[{"image": x} for x in xs]),
        "loader": dict(calibration=torch.utils.data.DataLoader(dataset, batch_size=8)),
        "loader + collect": dict(calibration=torch.utils.data.DataLoader(dataset, batch_size=8),
                                 collect=lambda b: {"image": b[0]}),
        "forward_loop": dict(calibration=lambda m: [m(x) for x in xs]),
        "capped": dict(calibration=xs + [torch.randn(8, 8) * 100], calib_batches=3),
    }
    results = {}
    for name, kw in forms.items():
        m = copy.deepcopy(base)
        ss.sparsify(m, "2:4", method="sparsegpt", **kw)
        results[name] = (ss.masks(m), m.a.weight.detach().clone(), m.b.weight.detach().clone())
    ref = results["tensors"]
    for name, (masks, wa, wb) in results.items():
        assert all(torch.equal(masks[k], ref[0][k]) for k in ref[0]), name
        torch.testing.assert_close(wa, ref[1], rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(wb, ref[2], rtol=1e-4, atol=1e-5, msg=name)


def test_recalibrate_bn_re_estimates_statistics_from_the_pruned_model_and_restores_modes():
    model = oneshot_net()
    ss.sparsify(model, "2:4", pad=True)
    model.train()
    model[0].eval()  # an odd mix of modes, restored exactly
    modes = [m.training for m in model.modules()]
    xs = calibration_batches(3)
    ss.recalibrate_bn(model, xs)
    with torch.no_grad():
        ys = [model[0](x) for x in xs]
    bn = model[1]  # a cumulative average of the batches' statistics
    mean = torch.stack([y.mean((0, 2, 3)) for y in ys]).mean(0)
    var = torch.stack([y.var((0, 2, 3), unbiased=True) for y in ys]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert [m.training for m in model.modules()] == modes and bn.momentum == 0.1


def test_sparsify_recalibrate_bn_matches_calling_it_after():
    xs = calibration_batches(2)
    a, b = oneshot_net(), oneshot_net()
    ss.sparsify(a, "2:4", pad=True, recalibrate_bn=True, calibration=xs)
    ss.sparsify(b, "2:4", pad=True)
    ss.recalibrate_bn(b, xs)
    torch.testing.assert_close(a[1].running_var, b[1].running_var)


@pytest.mark.parametrize("prior_from", ["sparsegpt", "wanda"])
def test_learned_masks_start_from_the_calibrated_mask(prior_from):
    xs = calibration_batches(2)
    oneshot, learned = oneshot_net(), oneshot_net()
    ss.sparsify(oneshot, "2:4", method=prior_from, calibration=xs, pad=True)
    ss.sparsify(learned, "2:4", method="gumbel", prior_from=prior_from, calibration=xs, pad=True, total_steps=10)
    want, got = ss.masks(oneshot), ss.masks(learned)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    oneshot.eval()
    learned.eval()
    with torch.no_grad():
        torch.testing.assert_close(learned(xs[0]), oneshot(xs[0]))


@pytest.mark.parametrize("groups, pad", [(1, False), (2, False), (1, True)], ids=["conv", "grouped", "taps"])
def test_conv_hessian_columns_follow_the_layout_so_the_reported_error_is_the_convs_output_error(groups, pad):
    torch.manual_seed(0)
    cin = 3 if pad else 8
    conv = nn.Conv2d(cin, 8, 3, padding=1, stride=2, groups=groups, bias=False)
    model = nn.Sequential(conv)
    dense = conv.weight.detach().clone()
    x = torch.randn(4, cin, 9, 9)
    rep = ss.sparsify(model, "2:4", method="sparsegpt", calibration=[x], pad=pad)
    with torch.no_grad():
        ref = nn.functional.conv2d(x, dense, padding=1, stride=2, groups=groups)
        got = model(x)
    want = float((got - ref).norm() / ref.norm())
    assert rep.layers[0].extra["rel_err"] == pytest.approx(want, rel=1e-3)
    # and the reconstruction beats the magnitude mask on the same inputs
    mag = nn.Sequential(nn.Conv2d(cin, 8, 3, padding=1, stride=2, groups=groups, bias=False))
    with torch.no_grad():
        mag[0].weight.copy_(dense)
    ss.sparsify(mag, "2:4", pad=pad)
    with torch.no_grad():
        assert (got - ref).norm() < (mag(x) - ref).norm()
