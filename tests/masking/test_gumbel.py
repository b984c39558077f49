"""Learned N:M masks (method="gumbel"): exact patterns, frozen weights, annealing, resume, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import semisparse as ss
from semisparse.layout import Layout
from semisparse.masking import gumbel
from semisparse.masking.gumbel import (
    GumbelMask,
    learned_masks,
    prior_logits,
    set_step,
    temperature,
    trainable_parameters,
)
from semisparse.patterns import NM, is_nm, pattern_table


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 12),
    )


def data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 12, (n,), generator=g)


def train_steps(model: nn.Module, steps: int, lr: float = 1e-2, wd: float = 0.0, opt=None):
    x, y = data()
    if opt is None:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def exact_nm(model_weight: torch.Tensor, layout: Layout, nm: NM) -> bool:
    view = layout.to_view(model_weight)
    return bool((view.reshape(view.shape[0], -1, nm.m).ne(0).sum(-1) <= nm.n).all())


def test_issue_snippet_finalize_gives_exact_2_4_and_same_eval_output():
    model = small_cnn()
    steps = 12
    ss.sparsify(model, "2:4", method="gumbel", trainable="mask", total_steps=steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = data()
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert temperature(model) == pytest.approx(0.05)  # annealed with no extra call
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)  # eval uses the deterministic argmax mask
    masks = ss.masks(model)
    layouts = {f"{sw_name}.weight": p.layout for sw_name, p in (("1", model[3].parametrizations.weight[0]),)}
    ss.check(model)
    ss.finalize(model)
    with torch.no_grad():
        c = model(x)
    assert torch.equal(a, c)
    assert set(model.state_dict()) == set(small_cnn().state_dict())
    for key in ("3.weight", "8.weight"):
        w = model.get_parameter(key)
        nm = NM(2, 4)
        lay = Layout("conv", tuple(w.shape)) if w.dim() == 4 else Layout("rows", tuple(w.shape))
        assert is_nm(lay.to_view(masks[key]), 2, 4)
        assert exact_nm(w.detach(), lay, nm)
        assert w.requires_grad  # finalize restored it
    assert layouts


def test_trainable_mask_keeps_dense_weights_bit_identical_even_with_weight_decay():
    model = small_cnn()
    ref = copy.deepcopy(model.state_dict())
    ss.sparsify(model, "2:4", method="gumbel", trainable="mask", total_steps=5)
    # even handing every parameter to a decaying optimizer must not move frozen weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-1, weight_decay=0.5)
    train_steps(model, 5, opt=opt)
    sd = model.state_dict()
    for key in ("3.weight", "8.weight"):
        mod, _, p = key.rpartition(".")
        assert torch.equal(sd[f"{mod}.parametrizations.{p}.original"], ref[key])
    assert torch.equal(sd["0.weight"], ref["0.weight"])  # the 3-channel stem is not sparsified, also frozen
    assert torch.equal(sd["3.bias"], ref["3.bias"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"3.parametrizations.weight.0.logits", "8.parametrizations.weight.0.logits"}


def test_trainable_all_trains_weights_and_masks_jointly():
    model = small_cnn()
    ref = copy.deepcopy(model.state_dict())
    ss.sparsify(model, "2:4", method="gumbel", trainable="all", total_steps=5)
    train_steps(model, 5)
    assert not torch.equal(model.state_dict()["3.parametrizations.weight.original"], ref["3.weight"])
    ss.finalize(model)
    ss.check(model)
    assert exact_nm(model[3].weight.detach(), Layout("conv", (16, 8, 3, 3)), NM(2, 4))


def test_pattern_table_is_a_constant_buffer_never_trained():
    model = small_cnn()
    ss.sparsify(model, "2:4", method="gumbel", trainable="all", total_steps=5)
    p = model[3].parametrizations.weight[0]
    assert "table" not in dict(model.named_parameters())
    assert not any(t is p.table for t in model.parameters())
    train_steps(model, 5, lr=1.0)
    assert torch.equal(p.table, pattern_table(2, 4).float())
    assert torch.equal(pattern_table(2, 4), pattern_table(2, 4))


def test_logits_are_compact_and_saved_with_schedule_position():
    model = small_cnn()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=10)
    sd = model.state_dict()
    # conv 16x8x3x3: view (16, 72) -> 18 groups of 4, C(4,2) = 6 patterns each
    assert sd["3.parametrizations.weight.0.logits"].shape == (6, 16, 18)
    assert sd["8.parametrizations.weight.0.logits"].shape == (6, 12, 16)
    assert sd["3.parametrizations.weight.0.step"].dtype == torch.long
    assert "3.parametrizations.weight.0.table" not in sd
    train_steps(model, 3)
    assert int(model.state_dict()["3.parametrizations.weight.0.step"]) == 3


def test_resumed_run_continues_the_same_annealing():
    def fresh():
        m = small_cnn()
        ss.sparsify(m, "2:4", method="gumbel", trainable="mask", total_steps=20)
        return m

    torch.manual_seed(1)
    full = fresh()
    train_steps(full, 10)
    # interrupted: 5 steps, checkpoint, new process rebuilds the model and optimizer, 5 more
    torch.manual_seed(1)
    first = fresh()
    opt = train_steps(first, 5)
    ckpt = {"model": copy.deepcopy(first.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    rng = torch.get_rng_state()
    second = fresh()
    second.load_state_dict(ckpt["model"])
    opt2 = torch.optim.AdamW([p for p in second.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    torch.set_rng_state(rng)
    assert learned_masks(second)[0].schedule()[0] == learned_masks(first)[0].schedule()[0]
    train_steps(second, 5, opt=opt2)
    # same RNG stream in both: compare against the uninterrupted run replayed identically
    torch.manual_seed(1)
    replay = fresh()
    replay_opt = train_steps(replay, 5)
    train_steps(replay, 5, opt=replay_opt)
    for a, b in zip(learned_masks(second), learned_masks(replay)):
        assert int(a.step) == int(b.step) == 10
        assert torch.allclose(a.logits, b.logits, atol=1e-6)
    assert int(learned_masks(full)[0].step) == 10


def test_set_step_pins_the_schedule():
    model = small_cnn()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=100, tau=(2.0, 1.0))
    set_step(model, 50)
    assert temperature(model) == pytest.approx(1.5)
    set_step(model, 1000)
    assert temperature(model) == pytest.approx(1.0)
    with pytest.raises(ss.SemisparseError):
        set_step(model, -1)


def test_magnitude_prior_argmax_is_the_magnitude_mask_and_zero_prior_is_uniform():
    a, b = small_cnn(), small_cnn()
    ss.sparsify(a, "2:4", method="gumbel", total_steps=5, prior=2.0)
    ss.sparsify(b, "2:4")
    ma, mb = ss.masks(a), ss.masks(b)
    assert all(torch.equal(ma[k], mb[k]) for k in mb)
    w = small_cnn()[3].weight
    assert torch.count_nonzero(prior_logits(w, Layout("conv", tuple(w.shape)), NM(2, 4), 0.0)) == 0


def test_eval_is_deterministic_and_training_samples():
    model = small_cnn()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=5, prior=0.0)
    p = model[3].parametrizations.weight[0]
    w = model[3].parametrizations.weight.original
    p.train()
    samples = {tuple(p(w).ne(0).flatten().tolist()) for _ in range(5)}
    assert len(samples) > 1
    p.eval()
    assert torch.equal(p(w), p(w))


def test_learned_masks_transfer_to_an_updated_dense_copy():
    learned = small_cnn()
    other = copy.deepcopy(learned)
    ss.sparsify(learned, "2:4", method="gumbel", total_steps=5, prior=0.5)
    train_steps(learned, 5, lr=0.5)
    with torch.no_grad():  # the other copy's dense weights moved on
        for p in other.parameters():
            p.add_(0.1)
    masks = ss.masks(learned)
    ss.sparsify(other, masks=masks)
    got = ss.masks(other)
    assert set(got) == set(masks) and all(torch.equal(got[k], masks[k]) for k in masks)
    ss.check(other)


def test_report_names_the_training_set_up():
    model = small_cnn()
    rep = ss.sparsify(model, "2:4", method="gumbel", total_steps=5, bn="freeze")
    text = str(rep)
    assert "trainable=mask" in text and "BatchNorm statistics frozen" in text
    assert [r.pattern for r in ss.report(model).sparse_layers] == ["2:4", "2:4"]


def test_bn_freeze_keeps_running_statistics_and_recalibrate_updates_them():
    frozen, recal = small_cnn(), small_cnn()
    ss.sparsify(frozen, "2:4", method="gumbel", total_steps=3, bn="freeze")
    ss.sparsify(recal, "2:4", method="gumbel", total_steps=3)
    ref = frozen[1].running_mean.clone()
    train_steps(frozen, 3)
    train_steps(recal, 3)
    assert torch.equal(frozen[1].running_mean, ref)
    assert not torch.equal(recal[1].running_mean, ref)


def test_options_train_bias_and_bn_train():
    model = small_cnn()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=3, train_bias=True, bn="train")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"3.bias", "8.bias", "1.weight", "1.bias"} <= trained
    assert "3.parametrizations.weight.original" not in trained


@pytest.mark.parametrize("reg", ["entropy", ("magnitude", 0.1)])
def test_regularizer_changes_logit_gradients_not_the_forward(reg):
    grads = []
    for r in (None, reg):
        model = small_cnn()
        ss.sparsify(model, "2:4", method="gumbel", total_steps=3, regularizer=r)
        x, y = data()
        torch.manual_seed(0)
        F.cross_entropy(model.train()(x), y).backward()
        grads.append(model[3].parametrizations.weight[0].logits.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("pattern", ["1:4", "2:4", "3:4", "1:2", "4:8", "2:8"])
def test_any_nm_up_to_70_patterns_finalizes_exactly(pattern):
    nm = ss.parse_pattern(pattern)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
    ss.sparsify(model, pattern, method="gumbel", total_steps=3, trainable="all")
    x = torch.randn(4, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    ss.check(model)
    ss.finalize(model)
    for lin in (model[0], model[2]):
        assert exact_nm(lin.weight.detach(), Layout("rows", tuple(lin.weight.shape)), nm)


def test_padded_kernel_tap_layout_never_keeps_padding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1))  # depthwise: 9 taps -> 12, padded
    ss.sparsify(model, "2:4", method="gumbel", total_steps=5, trainable="all", pad=True, prior=0.0)
    train_steps_x = torch.randn(2, 4, 5, 5)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(5):
        model(train_steps_x).sum().backward()
        opt.step()
        opt.zero_grad()
    ss.check(model)  # padded groups keep min(N, real taps) real weights
    assert int(ss.masks(model)["0.weight"].sum()) == 4 * (2 + 2 + 1)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    nm=st.sampled_from([(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (3, 6)]),
    seed=st.integers(0, 1000),
)
def test_property_samples_and_argmax_are_exact_nm(rows, groups, nm, seed):
    n, m = nm
    torch.manual_seed(seed)
    w = torch.randn(rows, groups * m) + 3.0  # no zeros in the weight
    layout = Layout("rows", tuple(w.shape))
    logits = torch.randn(math.comb(m, n), rows, groups)
    p = GumbelMask(layout, NM(n, m), logits, total_steps=10, tau=(2.0, 0.5), scale=(1.0, 1.0))
    p.train()
    sample = p(w.requires_grad_(False))
    assert is_nm(sample.ne(0), n, m)
    assert torch.equal(sample[sample.ne(0)], w[sample.ne(0)])  # exactly 0/1 in the forward
    p.eval()
    assert is_nm(p.hard_mask(), n, m)
    assert torch.equal(p.hard_mask(), p.table.bool()[logits.argmax(0)].reshape(rows, -1))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": -5}, "total_steps"),
        ({}, "total_steps"),
        ({"total_steps": 10, "tau": (0.5, 2.0)}, "anneal downwards"),
        ({"total_steps": 10, "tau": (1.0, -1.0)}, "tau"),
        ({"total_steps": 10, "trainable": "weights"}, "trainable"),
        ({"total_steps": 10, "bn": "maybe"}, "bn"),
        ({"total_steps": 10, "prior": -1}, "prior"),
        ({"total_steps": 10, "regularizer": "l7"}, "regularizer"),
        ({"total_steps": 10, "temperature": 3}, "unknown option"),
    ],
)
def test_bad_options_are_one_line_errors_and_leave_the_model_alone(options, match):
    model = small_cnn()
    ref = copy.deepcopy(model.state_dict())
    with pytest.raises(ss.SemisparseError, match=match):
        ss.sparsify(model, "2:4", method="gumbel", **options)
    assert set(model.state_dict()) == set(ref)
    assert all(p.requires_grad for p in model.parameters())


def test_too_many_patterns_and_fanin_are_errors():
    with pytest.raises(ss.SemisparseError, match="at most 70"):
        ss.sparsify(nn.Linear(20, 4), "5:10", method="gumbel", total_steps=5)
    with pytest.raises(ss.SemisparseError, match="N:M"):
        ss.sparsify(nn.Linear(20, 4), 0.5, method="gumbel", total_steps=5)


def test_nothing_to_train_is_an_error():
    model = small_cnn()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ss.SemisparseError, match="nothing to train"):
        trainable_parameters(model)
    with pytest.raises(ss.SemisparseError):  # trainable is not an option of fixed masks
        ss.sparsify(small_cnn(), "2:4", trainable="mask")
    learned = small_cnn()
    ss.sparsify(learned, "2:4", method="gumbel", total_steps=3)
    assert len(trainable_parameters(learned)) == 2


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("hard", [True, False])
def test_hand_written_backward_matches_autograd_of_the_relaxation(hard, fused, monkeypatch):
    monkeypatch.setattr(gumbel, "USE_NUMBA", fused and gumbel.HAVE_NUMBA)
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    logits = torch.randn(6, 6, 4)  # (P, rows, G)
    p = GumbelMask(Layout("rows", (6, 16)), NM(2, 4), logits.clone(), total_steps=10, tau=(0.7, 0.7),
                   scale=(1.5, 1.5), hard=hard)
    p.train()
    up = torch.randn(6, 16)
    torch.manual_seed(5)
    (p(w) * up).sum().backward()
    # reference: the same Gumbel draw, plain autograd through softmax(y / tau) @ table
    ref = logits.clone().requires_grad_(True)
    torch.manual_seed(5)
    noise = torch.rand(6, 6, 4).log_().neg_().log_()
    probs = torch.softmax((ref * 1.5 - noise) / 0.7, 0).permute(1, 2, 0)  # (rows, G, P)
    soft = probs @ pattern_table(2, 4).float()
    hard_groups = pattern_table(2, 4).float()[probs.argmax(-1)]
    groups = hard_groups + soft - soft.detach() if hard else soft
    (w * groups.reshape(6, 16) * up).sum().backward()
    torch.testing.assert_close(p.logits.grad, ref.grad, rtol=1e-5, atol=1e-6)
    assert int(p.step) == 1


@pytest.mark.skipif(not gumbel.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("shape", [(8, 12, 3, 3), (6, 16), (4, 8, 1, 5)])
def test_fused_kernels_equal_the_torch_reference(shape, monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(shape)
    layout = Layout("conv" if len(shape) > 2 else "rows", shape)
    logits = prior_logits(w, layout, NM(2, 4), 1.0)
    up = torch.randn(shape)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(gumbel, "USE_NUMBA", fused)
        p = GumbelMask(layout, NM(2, 4), logits.clone(), total_steps=10, tau=(0.9, 0.9), scale=(2.0, 2.0))
        p.train()
        torch.manual_seed(3)
        out = p(w)
        (out * up).sum().backward()
        results.append((out.detach(), p.logits.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert is_nm(layout.to_view(results[0][0].ne(0)), 2, 4)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_save_keeps_dense_weights_beside_learned_masks(tmp_path):
    model = small_cnn()
    dense = copy.deepcopy(model.state_dict())
    ss.sparsify(model, "2:4", method="gumbel", total_steps=4, prior=0.5)
    train_steps(model, 4, lr=0.5)
    masks = ss.masks(model)
    path = ss.save(model, tmp_path / "learned.safetensors", keep_dense=True)
    back = ss.load(path, model=small_cnn(seed=1))
    got = ss.masks(back)
    assert set(got) == set(masks) and all(torch.equal(got[k], masks[k]) for k in masks)
    for key in masks:  # the dense weights underneath survive, not only the kept values
        mod, _, p = key.rpartition(".")
        assert torch.equal(back.get_submodule(mod).parametrizations[p].original, dense[key])


def test_finalize_unfreezes_everything_mask_training_froze():
    model = small_cnn()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=2, bn="freeze")
    assert not model[0].weight.requires_grad and not model[1].weight.requires_grad
    ss.finalize(model)
    assert all(p.requires_grad for p in model.parameters())
    # the BatchNorm freeze hook is gone too: training mode updates running statistics again
    ref = model[1].running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 6, 6))
    assert not torch.equal(model[1].running_mean, ref)
