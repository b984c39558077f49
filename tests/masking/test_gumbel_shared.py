"""Learned N:M masks shared by blocks of rows (method="gumbel", shared_rows=s): one set of logits per block,
the same sampled and final pattern in every row of it, each row still N:M, gradients summed over the block."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semisparse as ss
from semisparse.layout import Layout
from semisparse.masking import gumbel, sampling_triton
from semisparse.masking.gumbel import GumbelMask, learned_masks, mask_logits, prior_logits, set_step
from semisparse.patterns import NM, is_nm, pattern_table
from semisparse.runtime import deploy, deployed_layers
from semisparse.runtime.cpu import kernels


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 18, 3, padding=1), nn.BatchNorm2d(18), nn.ReLU(),  # 18 rows: a last block of 2
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(72, 12),
    )


def train_steps(model: nn.Module, steps: int, lr: float = 1e-2) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 12, (16,), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def assert_shared(mask: torch.Tensor, layout: Layout, s: int, nm: NM | None = None) -> None:
    """Every block of ``s`` consecutive rows of the view holds the same mask (and each row is N:M)."""
    view = layout.to_view(mask, 4)
    for b in range(0, view.shape[0], s):
        assert torch.equal(view[b : b + s], view[b].expand_as(view[b : b + s])), f"rows {b}..{b + s - 1} differ"
    if nm is not None and layout.mode != "taps":  # (padded layouts: check() counts real weights)
        assert is_nm(view.ne(0), nm.n, nm.m)


def model_masks_shared(model: nn.Module, s: int) -> None:
    for sw in ss.masking.sparse_weights(model):
        p = sw.parametrization
        assert_shared(getattr(sw.module, sw.param).ne(0), p.layout, s, p.target)


BACKENDS = ["torch", "compiled"] + (["numba"] if gumbel.HAVE_NUMBA else []) + (
    ["triton"] if sampling_triton.available() and sampling_triton.interpreting() else [])  # CPU tensors: interpreted


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setitem(gumbel._BACKEND, "name", request.param)
    monkeypatch.setitem(gumbel._COMPILED, "backend", "aot_eager")  # the traced graph without a C++ build
    monkeypatch.setattr(gumbel, "USE_NUMBA", request.param == "numba")
    return request.param


# (layout, sampler): "rows"/"conv" hard samples go through the backend; soft samples and padded layouts
# through the pattern planes
CASES = [
    ("rows", (20, 16), True), ("rows", (18, 16), True), ("conv", (12, 8, 3, 3), True), ("conv", (10, 8, 1, 2), True),
    ("rows", (18, 16), False), ("taps", (5, 3, 3, 3), True), ("taps", (5, 3, 3, 3), False),
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mode, shape, hard", CASES)
def test_sampled_and_argmax_masks_are_the_same_in_every_row_of_a_block(backend, mode, shape, hard):
    layout, nm = Layout(mode, shape), NM(2, 4)
    torch.manual_seed(0)
    w = torch.randn(shape)
    logits = prior_logits(w, layout, nm, 0.5, shared_rows=4)
    allowed = gumbel._allowed_patterns(layout, nm, pattern_table(2, 4))
    p = GumbelMask(layout, nm, logits.masked_fill(~allowed, 0.0) if allowed is not None else logits,
                   total_steps=10, tau=(2.0, 2.0), scale=(1.0, 1.0), hard=hard, allowed=allowed, shared_rows=4)
    p.train()
    ones = torch.ones(shape, requires_grad=True)
    assert p.sampler(ones) == (backend if hard and mode != "taps" else "planes")
    for _ in range(5):  # weak prior, hot samples: rows would differ if each drew its own
        sample = p(ones)
        assert_shared(sample.detach(), layout, 4, nm if hard else None)
        sample.sum().backward()
    p.check("w")
    assert_shared(p.hard_mask(), layout, 4, nm)
    assert p.pattern_index().shape == (-(-layout.to_view(w, 4).shape[0] // 4), logits.shape[2])


def test_logits_are_one_row_per_block_and_the_prior_is_the_shared_magnitude_mask():
    learned, fixed = small_cnn(), small_cnn()
    ss.sparsify(learned, "2:4", method="gumbel", total_steps=5, shared_rows=4)
    ss.sparsify(fixed, "2:4", shared_rows=4)
    sd = learned.state_dict()
    assert sd["3.parametrizations.weight.0.logits"].shape == (6, 5, 18)  # 18 rows -> 5 blocks, 72 / 4 groups
    assert sd["8.parametrizations.weight.0.logits"].shape == (6, 3, 18)
    a, b = ss.masks(learned), ss.masks(fixed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


def test_a_shared_prior_mask_is_kept_and_a_per_row_one_gives_each_block_its_most_kept_pattern():
    layout, nm = Layout("rows", (4, 4)), NM(2, 4)
    per_row = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    idx = mask_logits(per_row, layout, nm, 3.0, shared_rows=4).argmax(0)  # (1 block, 1 group)
    table = pattern_table(2, 4).bool()
    assert table[idx.item()].tolist() == [True, True, False, False]  # slots kept 3, 2, 2, 1 times
    shared = per_row[:1].expand(4, 4)
    assert torch.equal(mask_logits(shared, layout, nm, 3.0, shared_rows=4), mask_logits(shared[:1], Layout(
        "rows", (1, 4)), nm, 3.0))


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_logit_gradient_is_the_sum_over_the_blocks_rows(backend, hard):
    """Against plain autograd of the relaxation with one Gumbel draw per block, broadcast to its rows."""
    torch.manual_seed(0)
    rows, k, s = 10, 16, 4  # blocks of 4, 4, 2 rows
    w = torch.randn(rows, k)
    logits = torch.randn(6, 3, k // 4)
    p = GumbelMask(Layout("rows", (rows, k)), NM(2, 4), logits.clone(), total_steps=10, tau=(0.7, 0.7),
                   scale=(1.5, 1.5), hard=hard, shared_rows=s)
    p.train()
    up = torch.randn(rows, k)
    torch.manual_seed(5)
    (p(w) * up).sum().backward()
    ref = logits.clone().requires_grad_(True)
    torch.manual_seed(5)
    noise = torch.rand(6, 3, k // 4).log_().neg_().log_()  # one draw per (block, group)
    probs = torch.softmax((ref * 1.5 - noise) / 0.7, 0).permute(1, 2, 0).repeat_interleave(s, 0)[:rows]
    soft = probs @ pattern_table(2, 4).float()
    hard_groups = pattern_table(2, 4).float()[probs.argmax(-1)]
    groups = hard_groups + soft - soft.detach() if hard else soft
    (w * groups.reshape(rows, k) * up).sum().backward()
    torch.testing.assert_close(p.logits.grad, ref.grad, rtol=1e-5, atol=1e-6)
    assert int(p.step) == 1


def test_trainable_all_weight_gradient_is_the_shared_mask():
    torch.manual_seed(0)
    w = torch.randn(8, 16, requires_grad=True)
    p = GumbelMask(Layout("rows", (8, 16)), NM(2, 4), torch.randn(6, 2, 4), total_steps=4, tau=(1.0, 1.0),
                   scale=(1.0, 1.0), shared_rows=4)
    p.train()
    out = p(w)
    out.sum().backward()
    assert torch.equal(w.grad, out.detach().ne(0).float())


def test_training_changes_the_masks_and_keeps_them_shared_and_n_m():
    model = small_cnn()
    ss.sparsify(model, "2:4", method="gumbel", trainable="mask", total_steps=20, prior=0.5, shared_rows=4,
                regularizer="magnitude")
    start = ss.masks(model)
    dense = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("original")}
    train_steps(model, 20, lr=0.5)
    model.eval()
    ss.check(model)
    model_masks_shared(model, 4)
    assert any(not torch.equal(start[k], v) for k, v in ss.masks(model).items())
    assert all(torch.equal(dense[k], model.state_dict()[k]) for k in dense)  # weights frozen, logits learned


def test_state_dict_round_trip_set_step_and_finalize():
    model = small_cnn()
    ss.sparsify(model, "2:4", method="gumbel", trainable="mask", total_steps=10, prior=0.5, shared_rows=4)
    train_steps(model, 3, lr=0.5)
    state = copy.deepcopy(model.state_dict())
    back = small_cnn(seed=1)
    ss.sparsify(back, "2:4", method="gumbel", trainable="mask", total_steps=10, shared_rows=4)
    back.load_state_dict(state)
    for a, b in zip(learned_masks(model), learned_masks(back)):
        assert torch.equal(a.logits, b.logits) and int(b.step) == 3 and b.schedule() == a.schedule()
    masks = ss.masks(model)
    assert all(torch.equal(ss.masks(back)[k], masks[k]) for k in masks)
    unshared = small_cnn()
    ss.sparsify(unshared, "2:4", method="gumbel", total_steps=10)
    with pytest.raises(RuntimeError, match="size mismatch"):
        unshared.load_state_dict(state)
    set_step(back, 7)
    train_steps(back, 1)
    assert int(learned_masks(back)[0].step) == 8
    masks = ss.masks(back)
    ss.finalize(back)
    assert all(p.requires_grad for p in back.parameters())
    for key, mask in masks.items():  # the shared argmax masks baked in
        layer = back.get_submodule(key[: -len(".weight")])
        assert torch.equal(layer.weight.ne(0), mask)
        assert_shared(mask, Layout("conv" if mask.dim() == 4 else "rows", tuple(mask.shape)), 4, NM(2, 4))


def test_compressed_file_keeps_the_shared_masks(tmp_path):
    model = small_cnn()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=4, prior=0.5, shared_rows=4)
    train_steps(model, 4, lr=0.5)
    masks = ss.masks(model)
    back = ss.load(ss.save(model, tmp_path / "shared.safetensors"), model=small_cnn(seed=1))
    got = ss.masks(back)
    assert all(torch.equal(got[k], masks[k]) for k in masks)


def test_shared_rows_1_is_todays_masks_bit_for_bit():
    runs = []
    for opts in ({}, {"shared_rows": 1}):
        model = small_cnn()
        ss.sparsify(model, "2:4", method="gumbel", total_steps=10, prior=0.5, **opts)
        torch.manual_seed(3)
        train_steps(model, 3, lr=0.5)
        runs.append(model.state_dict())
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("value", [0, -4, 2.0, True, "4", None])
def test_bad_shared_rows_is_a_one_line_error_and_leaves_the_model_alone(value):
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ss.SemisparseError, match=r"shared_rows must be an int >= 1 .*got") as info:
        ss.sparsify(model, "2:4", method="gumbel", total_steps=4, shared_rows=value)
    assert "\n" not in str(info.value)
    assert not ss.masking.is_sparsified(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_logits_of_the_wrong_number_of_blocks_are_refused():
    with pytest.raises(ss.SemisparseError, match="expected 3"):
        GumbelMask(Layout("rows", (10, 16)), NM(2, 4), torch.zeros(6, 10, 4), total_steps=4, tau=(1.0, 1.0),
                   scale=(1.0, 1.0), shared_rows=4)


@pytest.mark.skipif(not kernels.available(), reason="no C compiler: fast kernels unavailable")
def test_learned_shared_masks_deploy_with_the_rows4_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(24 * 25, 40))
    ss.sparsify(model, "2:4", method="gumbel", trainable="mask", total_steps=5, prior=0.5, shared_rows=4)
    x, y = torch.randn(8, 16, 5, 5), torch.randn(8, 40)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(5):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    dep = deploy(model, plan="condensed", example_input=x[:1])
    (_, conv), (_, lin) = deployed_layers(dep)
    assert conv._idx_table().rows_in_fours() and lin._idx_table().rows_in_fours()  # the blocks are detected
    one, many = x[:1], torch.randn(30, 16, 5, 5)
    assert conv.variants(one)[-1]["rows4"] and lin.variants(torch.randn(30, lin.in_features))[-1]["rows4"]
    conv.use_variant(conv.variants(one)[-1])
    with torch.no_grad():
        torch.testing.assert_close(dep(one), model(one), rtol=1e-5, atol=1e-5)
        conv.use_variant(conv.variants(many)[0])
        lin.use_variant(lin.variants(torch.randn(30, lin.in_features))[-1])
        torch.testing.assert_close(dep(many), model(many), rtol=1e-5, atol=1e-5)


def test_a_calibrated_prior_starts_shared_masks_from_the_blocks_most_kept_patterns():
    model = small_cnn()
    calibration = [torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ss.sparsify(model, "2:4", method="gumbel", total_steps=4, shared_rows=4, prior_from="sparsegpt",
                calibration=calibration)
    model.eval()
    ss.check(model)
    model_masks_shared(model, 4)


def test_magnitude_regularizer_gradient_counts_every_row_of_a_block():
    """Closed-form gradient against autograd of ``-lam * sum(softmax(z) @ table * w^2) / sum(w^2)`` with each
    block's probabilities broadcast to its rows."""
    from semisparse.masking.sampling import to_slots

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 10, 3))  # 10 rows: blocks of 4, 4, 2
    ss.sparsify(model, "2:4", method="gumbel", total_steps=5, trainable="all", prior=0.5, shared_rows=4)
    p, w = model[0].parametrizations.weight[0], model[0].parametrizations.weight.original
    x = torch.randn(2, 8, 5, 5)
    grads = []
    for reg in (None, ("magnitude", 0.3)):
        p.regularizer, p.logits.grad = reg, None
        set_step(model, 0)
        torch.manual_seed(1)
        model.train()(x).square().sum().backward()
        grads.append(p.logits.grad.clone())
    leaf = p.logits.detach().clone().requires_grad_(True)
    sq = to_slots(p.layout, w.detach(), 4).square()  # (M, 10, G)
    prob = torch.softmax(leaf, 0).repeat_interleave(4, 1)[:, :10]
    kept = torch.einsum("prg,pm->mrg", prob, pattern_table(2, 4).float())
    (ref,) = torch.autograd.grad(-0.3 * (kept * sq).sum() / sq.sum(), leaf)
    torch.testing.assert_close(grads[1] - grads[0], ref, rtol=1e-4, atol=1e-6)
    assert ref.abs().sum() > 0
