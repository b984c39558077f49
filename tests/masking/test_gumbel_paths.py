"""Learned-mask samplers (lean torch, Triton, numba) against a frozen copy of the original computation,
the host-op budget of a learned-mask step, and checkpoints in the original key layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semisparse as ss
from semisparse.layout import Layout
from semisparse.masking import gumbel, sampling_triton
from semisparse.masking.gumbel import GumbelMask, learned_masks, prior_logits, set_step
from semisparse.patterns import NM, is_nm

# --- a frozen copy of the reference computation (semisparse before the lean paths) ----------------------


def _ref_argmax0(y):
    best = y[0].clone()
    idx = torch.zeros(y.shape[1:], dtype=torch.uint8)
    for p in range(1, y.shape[0]):
        idx.masked_fill_(y[p] > best, p)
        torch.maximum(best, y[p], out=best)
    return best, idx


def _ref_patterns_to_slots(idx, table, dtype):
    planes = torch.zeros(table.shape[1], *idx.shape, dtype=dtype)
    for p, row in enumerate(table.bool().tolist()):
        hit = idx == p
        for j, keep in enumerate(row):
            if keep:
                planes[j].add_(hit)
    return planes


def _ref_slot_weighted(planes, table):
    out = torch.empty(table.shape[0], *planes.shape[1:], dtype=planes.dtype)
    for p, row in enumerate(table.bool().tolist()):
        kept = [j for j, k in enumerate(row) if k]
        out[p].copy_(planes[kept[0]])
        for j in kept[1:]:
            out[p].add_(planes[j])
    return out


def _ref_softmax0(y, best, tau):
    e = (y - best).div_(tau).exp_()
    return e.div_(e.sum(0))


class _RefSampled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, table, scale, tau):
        y = logits.detach() * scale
        y.sub_(torch.rand_like(y).log_().neg_().log_())
        best, idx = _ref_argmax0(y)
        ctx.save_for_backward(y, best, table)
        ctx.scale, ctx.tau = scale, tau
        return _ref_patterns_to_slots(idx, table, logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, best, table = ctx.saved_tensors
        prob = _ref_softmax0(y, best, ctx.tau)
        gp = _ref_slot_weighted(grad.contiguous(), table)
        dot = (prob * gp).sum(0)
        return prob.mul_(gp.sub_(dot)).mul_(ctx.scale / ctx.tau), None, None, None


def _ref_from_slots(layout, planes):
    m = planes.shape[0]
    out, cin = layout.shape[0], layout.shape[1]
    return planes.reshape(m, out, cin // m, -1).permute(1, 2, 0, 3).reshape(layout.shape)


def reference_forward(p: GumbelMask, weight: torch.Tensor, step: int) -> torch.Tensor:
    tau, scale = p.schedule(step)
    return weight * _ref_from_slots(p.layout, _RefSampled.apply(p.logits, p.table, scale, tau))


# --- helpers ---------------------------------------------------------------------------------------------


def layout_of(shape):
    return Layout("conv" if len(shape) > 2 else "rows", tuple(shape))


def make_mask(shape, nm, seed=0, prior=1.0, steps=(0.9, 0.5)):
    torch.manual_seed(seed)
    w = torch.randn(shape)
    layout = layout_of(shape)
    logits = prior_logits(w, layout, NM(*nm), prior)
    p = GumbelMask(layout, NM(*nm), logits, total_steps=10, tau=(1.3, steps[1]), scale=(2.0, 5.0))
    return p.train(), w


def run(p, w, up, seed, fn=None, step=None):
    """Forward + backward with the same noise; returns (output, logits grad, weight grad)."""
    p.logits.grad = None
    w = w.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = fn(p, w, step) if fn is not None else p(w)
    (out * up).sum().backward()
    return out.detach(), p.logits.grad.clone(), w.grad.clone()


SHAPES = [((8, 12, 3, 3), (2, 4)), ((6, 16), (2, 4)), ((16, 8, 1, 1), (1, 4)), ((4, 16, 1, 3), (4, 8)),
          ((5, 8, 5), (3, 4)), ((3, 6, 2, 2), (2, 6))]  # fmt: skip


@pytest.mark.parametrize("shape, nm", SHAPES)
def test_lean_torch_path_gives_the_reference_masks_and_gradients(shape, nm, monkeypatch):
    monkeypatch.setattr(gumbel, "_BACKEND", {"name": "torch"})
    p, w = make_mask(shape, nm)
    up = torch.randn(shape)
    for step in (0, 4):  # two points of the schedule: tau and scale differ
        set_step_single(p, step)
        assert p.sampler(w) == "torch"
        ref = run(p, w, up, seed=step + 7, fn=reference_forward, step=step)
        got = run(p, w, up, seed=step + 7)
        assert torch.equal(got[0], ref[0])  # the same masks, exactly
        assert is_nm(p.layout.to_view(got[0].ne(0)), *nm)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
        assert torch.equal(got[2], ref[2])
        assert int(p.step) == step + 1 and p._host_step == step + 1  # the backward advanced both


def set_step_single(p: GumbelMask, step: int) -> None:
    p.step.fill_(step)
    p._host_step = step


def test_lean_path_on_a_channels_last_weight_and_a_trained_weight(monkeypatch):
    monkeypatch.setattr(gumbel, "_BACKEND", {"name": "torch"})
    p, w = make_mask((8, 12, 3, 3), (2, 4))
    up = torch.randn(8, 12, 3, 3)
    ref = run(p, w, up, seed=1, fn=reference_forward, step=0)
    set_step_single(p, 0)
    got = run(p, w.contiguous(memory_format=torch.channels_last), up, seed=1)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2], ref[2])


def test_eval_mask_is_the_argmax_pattern_in_the_weight_layout():
    for shape, nm in SHAPES:
        p, _ = make_mask(shape, nm, prior=0.0)
        with torch.no_grad():
            p.logits.normal_()
        _, idx = _ref_argmax0(p.logits.detach())
        ref = _ref_from_slots(p.layout, _ref_patterns_to_slots(idx, p.table, torch.bool))
        assert torch.equal(p.hard_mask(), ref)
        assert torch.equal(p.pattern_index(), idx.long())


# --- Triton kernels under the interpreter ----------------------------------------------------------------

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: under TRITON_INTERPRET=1 (conftest)
needs_triton = pytest.mark.skipif(
    not sampling_triton.available() or (TRITON_DEVICE == "cpu" and not sampling_triton.interpreting()),
    reason="triton is not installed, or neither a GPU nor TRITON_INTERPRET=1",
)


@needs_triton
@pytest.mark.parametrize("shape, nm, channels_last", [((8, 12, 3, 3), (2, 4), True), ((6, 16), (2, 4), False),
                                                      ((4, 16, 1, 3), (4, 8), False)])  # fmt: skip
def test_triton_kernels_equal_the_torch_path(shape, nm, channels_last, monkeypatch):
    p, w = make_mask(shape, nm)
    p.to(TRITON_DEVICE)
    w = w.to(TRITON_DEVICE)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    up = torch.randn(shape).to(TRITON_DEVICE)
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setattr(gumbel, "_BACKEND", {"name": backend})
        assert p.sampler(w) == backend
        set_step_single(p, 3)
        results.append(run(p, w, up, seed=11))
        assert int(p.step) == 4 and p._host_step == 4
    (mask_t, gl_t, gw_t), (mask_k, gl_k, gw_k) = results
    assert torch.equal(mask_k, mask_t)
    torch.testing.assert_close(gl_k, gl_t, rtol=1e-4, atol=1e-6)
    assert torch.equal(gw_k, gw_t)


@needs_triton
def test_triton_backward_without_a_weight_gradient(monkeypatch):
    monkeypatch.setattr(gumbel, "_BACKEND", {"name": "triton"})
    p, w = make_mask((6, 16), (2, 4))
    p.to(TRITON_DEVICE)
    w = w.to(TRITON_DEVICE)
    torch.manual_seed(0)
    out = p(w)  # w does not require grad (trainable="mask")
    out.sum().backward()
    assert p.logits.grad is not None and p.logits.grad.shape == p.logits.shape
    assert is_nm(out.ne(0).cpu(), 2, 4)


def test_backend_choice_is_validated_and_auto_never_picks_triton_on_cpu(monkeypatch):
    with pytest.raises(ss.SemisparseError, match="unknown mask sampling backend"):
        gumbel.set_backend("cuda")
    monkeypatch.setattr(gumbel, "_BACKEND", {"name": "auto"})
    monkeypatch.setattr(gumbel, "USE_NUMBA", False)
    p, w = make_mask((6, 16), (2, 4))
    assert p.sampler(w) == "torch"
    soft = GumbelMask(layout_of((6, 16)), NM(2, 4), p.logits.detach().clone(), total_steps=3, tau=(1.0, 1.0),
                      scale=(1.0, 1.0), hard=False)  # fmt: skip
    assert soft.sampler(w) == "planes"
    monkeypatch.setattr(gumbel, "_BACKEND", {"name": "triton"})
    monkeypatch.setattr(sampling_triton, "interpreting", lambda: False)
    with pytest.raises(ss.SemisparseError, match="runs on CUDA tensors"):
        p.sampler(w)


# --- host work of a learned-mask step ----------------------------------------------------------------------


def aten_ops_of_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Every aten op (nested ones included) of one SGD training step, after one untimed step."""
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def test_learned_mask_step_runs_at_most_1_5x_the_aten_ops_of_the_dense_step(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setattr(gumbel, "USE_NUMBA", False)  # numba's CPU kernels never run on a GPU
    monkeypatch.setattr(gumbel, "_BACKEND", {"name": "auto"})
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4,))
    dense = aten_ops_of_step(torchvision.models.resnet18(), x, y)
    model = torchvision.models.resnet18()
    ss.sparsify(model, "2:4", method="gumbel", trainable="mask", total_steps=100, prior=0.0)  # prior: no op count
    assert {p.sampler(p.logits) for p in learned_masks(model)} == {"torch"}
    learned = aten_ops_of_step(model, x, y)
    assert len(learned) <= 1.5 * len(dense), (len(learned), len(dense))
    # the schedule position is never read back from the tensor inside a step (a GPU sync per layer)
    assert "aten::_local_scalar_dense" not in learned and "aten::item" not in learned
    assert int(learned_masks(model)[0].step) == 2


# --- checkpoints in the original key layout ----------------------------------------------------------------


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 36, 12))  # fmt: skip


def test_a_checkpoint_in_the_original_key_layout_loads_and_resumes_the_schedule(monkeypatch):
    monkeypatch.setattr(gumbel, "_BACKEND", {"name": "torch"})
    # what the original code saved: dense weight, logits (P, rows, G) and the int64 position, per layer
    g = torch.Generator().manual_seed(5)
    dense = small_cnn(seed=3).state_dict()
    old = {
        "0.weight": dense["0.weight"], "0.bias": dense["0.bias"],
        "2.parametrizations.weight.original": dense["2.weight"], "2.bias": dense["2.bias"],
        "2.parametrizations.weight.0.logits": torch.randn(6, 16, 18, generator=g),
        "2.parametrizations.weight.0.step": torch.tensor(7),
        "5.parametrizations.weight.original": dense["5.weight"], "5.bias": dense["5.bias"],
        "5.parametrizations.weight.0.logits": torch.randn(6, 12, 144, generator=g),
        "5.parametrizations.weight.0.step": torch.tensor(7),
    }  # fmt: skip
    model = small_cnn()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=20)
    assert set(model.state_dict()) == set(old)
    model.load_state_dict(old)
    conv = model[2].parametrizations.weight[0]
    _, idx = _ref_argmax0(old["2.parametrizations.weight.0.logits"])
    assert torch.equal(ss.masks(model)["2.weight"], _ref_from_slots(conv.layout, _ref_patterns_to_slots(
        idx, conv.table, torch.bool)))  # fmt: skip
    # training resumes at position 7: the same sample and gradient as the reference at step 7
    w = model[2].parametrizations.weight.original.detach()
    up = torch.randn(w.shape, generator=g)
    ref = run(conv, w, up, seed=2, fn=reference_forward, step=7)
    conv.step.fill_(7)
    conv._host_step = None  # as after load_state_dict (the position is read once)
    got = run(conv, w, up, seed=2)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert int(conv.step) == 8 and conv._host_step == 8


def test_load_state_dict_refreshes_the_host_copy_of_the_position():
    model = small_cnn()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=20, tau=(2.0, 1.0))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["2.parametrizations.weight.0.step"] = torch.tensor(10)
    model.load_state_dict(sd)
    p = model[2].parametrizations.weight[0]
    assert p._host_step is None
    assert p.schedule()[0] == pytest.approx(1.5)
    set_step(model, 12)
    assert int(p.step) == 12 and p.schedule()[0] == pytest.approx(1.4)
    assert gumbel.temperature(model) == pytest.approx(1.4)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_a_training_forward_draws_exactly_one_uniform_per_logit(backend, monkeypatch):
    """Every hard path draws ``torch.rand_like(logits)`` once per sample (Triton's too): the same seed gives
    the same masks on every path, and a run can switch paths."""
    if backend == "numba" and not gumbel.HAVE_NUMBA:
        pytest.skip("numba not installed")
    monkeypatch.setattr(gumbel, "_BACKEND", {"name": backend})
    p, w = make_mask((8, 12, 3, 3), (2, 4))
    assert p.sampler(w) == backend
    torch.manual_seed(4)
    torch.rand(p.logits.shape)
    expected = torch.random.get_rng_state()
    torch.manual_seed(4)
    p(w)
    assert torch.equal(torch.random.get_rng_state(), expected)


# --- regularisers in closed form ------------------------------------------------------------------------------


def _ref_regularizer(kind, lam, logits, allowed, sq):
    """The original regularisers as losses of the logits (their autograd gradient is the reference)."""
    z = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
    if kind == "entropy":
        logp = torch.log_softmax(z, 0)
        return lam * -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(0).mean()
    table = ss.patterns.pattern_table(2, 4).float()
    return -lam * (torch.einsum("prg,pm->mrg", torch.softmax(z, 0), table) * sq).sum() / sq.sum().clamp_min(1e-12)


@pytest.mark.parametrize("kind", ["entropy", "magnitude"])
@pytest.mark.parametrize("padded", [False, True])
def test_closed_form_regularizer_gradients_equal_autograd_of_the_regularizer(kind, padded):
    from semisparse.masking.sampling import to_slots

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4) if padded else nn.Conv2d(8, 4, 3))
    ss.sparsify(model, "2:4", method="gumbel", total_steps=5, trainable="all", pad=padded, prior=0.5)
    p = model[0].parametrizations.weight[0]
    w = model[0].parametrizations.weight.original
    x = torch.randn(2, w.shape[1] * (4 if padded else 1), 5, 5)
    grads = {}
    for reg in (None, (kind, 0.3)):
        p.regularizer = reg
        p.logits.grad = None
        set_step(model, 0)
        torch.manual_seed(1)
        model.train()(x).square().sum().backward()
        grads[reg is not None] = p.logits.grad.clone()
    leaf = p.logits.detach().clone().requires_grad_(True)
    sq = to_slots(p.layout, w.detach(), 4).square()
    (ref,) = torch.autograd.grad(_ref_regularizer(kind, 0.3, leaf, p.allowed, sq), leaf)
    torch.testing.assert_close(grads[True] - grads[False], ref, rtol=1e-4, atol=1e-6)
    assert ref.abs().sum() > 0


def test_a_deep_copy_trains_with_its_own_schedule(monkeypatch):
    """The host-side schedule scalars are caches: a copy (EMA, deepcopy, pickle) must not share or lose them."""
    import copy

    monkeypatch.setattr(gumbel, "_BACKEND", {"name": "torch"})
    p, w = make_mask((6, 16), (2, 4))
    up = torch.randn(6, 16)
    run(p, w, up, seed=0)  # builds the caches at position 0
    twin = copy.deepcopy(p)
    set_step_single(twin, 4)
    ref = run(twin, w, up, seed=3, fn=reference_forward, step=4)
    set_step_single(twin, 4)
    got = run(twin, w, up, seed=3)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
