"""DynamicSparsity on real training loops: structure after every step, schedule, optimizer state, resume."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semisparse as ss
from semisparse import SemisparseError
from semisparse.dst import ConstantFanIn, DynamicSparsity, LayerBudget, UpdateSchedule, from_flags
from semisparse.dst.budgets import erk_densities, fanin_budgets


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def batches(n, seed=0, bs=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 8, 8, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def make_opt(model, kind):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)


def train(model, opt, sched, data, each=None):
    for i, (x, y) in enumerate(data):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        updated = sched.step()
        if each is not None:
            each(i + 1, updated)


def assert_masked_zero(sched):
    for layer in sched.layers:
        m = layer.mask.mask
        assert (layer.original.detach()[~m] == 0).all(), layer.key
        assert (getattr(layer.module, layer.param).detach()[~m] == 0).all(), layer.key


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
def test_srigl_constant_fanin_budget_and_zeros_after_every_step(opt_kind):
    model = tiny_cnn()
    opt = make_opt(model, opt_kind)
    sched = ss.SRigL(model, opt, sparsity=0.9, delta=3, t_end=40, ablation=0.3)
    budgets = {layer.key: layer.budget for layer in sched.layers}

    def each(step, updated):
        ss.check(model)
        for s in sched.layer_stats():
            counts = sched.layers[[lay.key for lay in sched.layers].index(s["key"])].layout.to_view(
                ss.masks(model)[s["key"]]).sum(1)
            assert ((counts == s["k"]) | (counts == 0)).all()
            assert s["kept"] == s["k"] * s["alive"] <= budgets[s["key"]]
        assert_masked_zero(sched)
        assert sched.achieved_sparsity >= 0.9 - 1e-9

    train(model, opt, sched, batches(45), each)


def test_layer_budgets_follow_erk():
    model = tiny_cnn()
    opt = make_opt(model, "sgd")
    sched = ss.SRigL(model, opt, sparsity=0.8, t_end=10, distribution="erk")
    shapes = [tuple(model[0].weight.shape), tuple(model[3].weight.shape), (64, 128), (10, 64)]
    ks = fanin_budgets(shapes, erk_densities(shapes, 0.8))
    got = {s["key"]: s["k"] for s in sched.layer_stats()}
    expect = dict(zip(["0.weight", "3.weight", "7.weight", "9.weight"], ks))
    assert {k: v for k, v in expect.items() if k in got} == got
    for layer, sh, k, d in zip(sched.layers, shapes, ks, erk_densities(shapes, 0.8)):
        assert layer.budget == math.floor(d * math.prod(sh) + 1e-9) >= k * sh[0]
    # Only Linear/Conv weights are masked; BatchNorm is never touched.
    assert set(ss.masks(model)) <= {"0.weight", "3.weight", "7.weight", "9.weight"}
    kept = sum(s["kept"] for s in sched.layer_stats()) + sum(
        math.prod(sh) for sh, key in zip(shapes, expect) if key not in got)
    assert sched.achieved_sparsity == pytest.approx(1 - kept / sum(math.prod(s) for s in shapes))
    assert 0.8 - 1e-9 <= sched.achieved_sparsity < 0.8 + 0.05


def test_uniform_rigl_budgets_and_count_preserved():
    model = tiny_cnn()
    opt = make_opt(model, "adamw")
    sched = ss.RigL(model, opt, sparsity=0.9, t_end=30, delta=2, distribution="uniform")
    before = {s["key"]: s["kept"] for s in sched.layer_stats()}
    for layer in sched.layers:
        assert layer.budget == max(1, math.floor(0.1 * layer.original.numel() + 1e-9))
        assert layer.mask.target is None
    train(model, opt, sched, batches(10), lambda *_: assert_masked_zero(sched))
    assert {s["key"]: s["kept"] for s in sched.layer_stats()} == before


def test_classifier_keeps_every_output_under_strong_ablation():
    model = tiny_cnn()
    opt = make_opt(model, "sgd")
    sched = ss.SRigL(model, opt, sparsity=0.95, delta=1, t_end=30, ablation=1.0)
    train(model, opt, sched, batches(20))
    stats = {s["key"]: s for s in sched.layer_stats()}
    assert stats["9.weight"]["alive"] == 10
    assert any(s["alive"] < s["neurons"] for s in stats.values())  # ablation did happen elsewhere


def test_no_ablation_modules_are_protected():
    model = tiny_cnn()
    opt = make_opt(model, "sgd")
    sched = ss.SRigL(model, opt, sparsity=0.95, delta=1, t_end=30, ablation=1.0, no_ablation=["7"])
    train(model, opt, sched, batches(10))
    stats = {s["key"]: s for s in sched.layer_stats()}
    assert stats["7.weight"]["alive"] == 64


@pytest.mark.parametrize("method", ["rigl", "srigl"])
def test_topology_changes_before_t_end_and_not_after(method):
    model = tiny_cnn()
    opt = make_opt(model, "sgd")
    factory = ss.RigL if method == "rigl" else ss.SRigL
    sched = factory(model, opt, sparsity=0.9, delta=4, t_end=20)
    history = []
    train(model, opt, sched, batches(40),
          lambda step, updated: history.append((step, updated, ss.masks(model))))
    changed = [step for (step, _, m), (_, _, prev) in zip(history[1:], history[:-1])
               if any(not torch.equal(m[k], prev[k]) for k in m)]
    assert changed and all(s % 4 == 0 and s < 20 for s in changed)
    assert [s for s, u, _ in history if u] == [4, 8, 12, 16]


def test_static_topology_never_changes():
    model = tiny_cnn()
    opt = make_opt(model, "sgd")
    sched = ss.RigL(model, opt, sparsity=0.9, static=True)
    start = ss.masks(model)
    train(model, opt, sched, batches(6))
    assert all(torch.equal(start[k], v) for k, v in ss.masks(model).items())


def test_grown_weights_start_at_zero_and_optimizer_state_is_reset():
    model = tiny_cnn()
    opt = make_opt(model, "adamw")
    sched = ss.RigL(model, opt, sparsity=0.8, delta=3, t_end=100, alpha=0.5)
    data = batches(3)
    for i, (x, y) in enumerate(data):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 2:
            before = {lay.key: (lay.mask.mask.clone(), lay.original.detach().clone()) for lay in sched.layers}
        assert sched.step() == (i == 2)
    for lay in sched.layers:
        old, w_old = before[lay.key]
        new = lay.mask.mask
        grown, kept = new & ~old, new & old
        assert grown.any()
        assert (lay.original[grown] == 0).all()
        assert torch.equal(lay.original[kept], w_old[kept])
        state = opt.state[lay.original]
        for name in ("exp_avg", "exp_avg_sq"):
            assert (state[name][~kept] == 0).all()
            assert (state[name][kept] != 0).any()


def test_sgd_momentum_reset_on_update():
    model = tiny_cnn()
    opt = make_opt(model, "sgd")
    sched = ss.SRigL(model, opt, sparsity=0.8, delta=2, t_end=100, alpha=0.5)
    train(model, opt, sched, batches(2))
    for lay in sched.layers:
        buf = opt.state[lay.original]["momentum_buffer"]
        assert (buf[~lay.mask.mask] == 0).all()


def test_sparse_init_uses_std_of_the_sparse_fan_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2000, 400), nn.ReLU(), nn.Linear(400, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = ss.SRigL(model, opt, sparsity=0.9, t_end=10, distribution="uniform")
    lay = sched.layers[0]
    k = lay.mask.target
    assert k == 200
    kept = lay.original.detach()[lay.mask.mask]
    assert kept.std().item() == pytest.approx(math.sqrt(2 / k), rel=0.03)  # not 2 / fan_in (the research code's bug)


def _dense_grad_step(model, sched, opt, grads):
    """One optimizer step whose loss is sum(W_eff * G) per micro-batch: the dense gradient is sum(G)."""
    for g in grads:
        loss = (model.weight * g).sum()
        loss.backward()
    opt.step()
    opt.zero_grad()
    return sched.step()


@pytest.mark.parametrize("micro", [1, 3])
def test_growth_uses_dense_gradient_summed_over_micro_batches(micro):
    torch.manual_seed(0)
    model = nn.Linear(20, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = ss.RigL(model, opt, sparsity=0.75, delta=1, t_end=1000, alpha=0.3, distribution="uniform")
    mask = sched.layers[0].mask.mask.clone()
    w = sched.layers[0].original.detach().clone()
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(6, 20, generator=gen) for _ in range(micro)]
    assert _dense_grad_step(model, sched, opt, grads)
    frac = sched.schedule.drop_fraction(1)
    n_active = int(mask.sum())
    n_drop = int(n_active * frac)
    kept = torch.zeros(120, dtype=torch.bool)
    kept[torch.topk(torch.where(mask, w.abs(), torch.tensor(-1.0)).reshape(-1), n_active - n_drop).indices] = True
    dense = torch.stack(grads).sum(0).abs().reshape(-1)
    expect_grown = torch.topk(torch.where(kept, torch.tensor(-1.0), dense), n_drop).indices
    new = sched.layers[0].mask.mask.reshape(-1)
    assert sorted((new & ~kept).nonzero().flatten().tolist()) == sorted(expect_grown.tolist())
    assert n_drop > 0


def test_resume_equals_uninterrupted():
    data = batches(30, seed=3)

    def build():
        model = tiny_cnn(seed=1)
        opt = make_opt(model, "adamw")
        return model, opt, ss.SRigL(model, opt, sparsity=0.9, delta=4, t_end=25)

    m1, o1, s1 = build()
    train(m1, o1, s1, data)

    m2, o2, s2 = build()
    train(m2, o2, s2, data[:13])
    ckpt = copy.deepcopy({"model": m2.state_dict(), "opt": o2.state_dict(), "sched": s2.state_dict()})
    m3, o3, s3 = build()
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    s3.load_state_dict(ckpt["sched"])
    train(m3, o3, s3, data[13:])
    sd1, sd3 = m1.state_dict(), m3.state_dict()
    assert sd1.keys() == sd3.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd3[k]), k
    assert s1.state_dict() == s3.state_dict()


def test_nm_variant_valid_after_every_step():
    model = tiny_cnn()
    opt = make_opt(model, "adamw")
    sched = ss.SRigL(model, opt, pattern="2:4", delta=2, t_end=20)
    assert "0.weight" not in ss.masks(model)  # 3 input channels: not a multiple of 4
    changes = []
    prev = ss.masks(model)

    def each(step, updated):
        nonlocal prev
        ss.check(model)
        now = ss.masks(model)
        changes.append(any(not torch.equal(now[k], prev[k]) for k in now))
        prev = now
        assert_masked_zero(sched)

    train(model, opt, sched, batches(12), each)
    assert any(changes)
    for p in sched.layers:
        assert str(p.mask.target) == "2:4"


def test_srste_valid_nm_every_step_and_straight_through_gradient():
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = ss.SRSTE(model, opt, pattern="2:4", decay=0.1)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    p = model[7].parametrizations.weight
    assert (p.original.grad[~p[0].mask] != 0).any()  # straight-through: pruned weights get a gradient
    opt.zero_grad()
    start = ss.masks(model)
    train(model, opt, sched, batches(5), lambda *_: ss.check(model))
    assert sched.step_count == 5
    assert any(not torch.equal(start[k], v) for k, v in ss.masks(model).items())


def test_srste_gradient_formula():
    torch.manual_seed(0)
    model = nn.Linear(8, 3, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ss.SRSTE(model, opt, "2:4", decay=0.5)
    g = torch.randn(3, 8)
    (model.weight * g).sum().backward()
    p = model.parametrizations.weight
    w, m = p.original.detach(), p[0].mask
    assert torch.allclose(p.original.grad, g + 0.5 * w * ~m)


def test_finalize_after_dst_gives_original_keys():
    model = tiny_cnn()
    keys = list(model.state_dict())
    opt = make_opt(model, "sgd")
    sched = ss.SRigL(model, opt, sparsity=0.9, delta=2, t_end=10)
    train(model, opt, sched, batches(4))
    masks = ss.masks(model)
    ss.finalize(model)
    assert list(model.state_dict()) == keys
    for k, m in masks.items():
        assert (model.state_dict()[k][~m] == 0).all()


# -- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"sparsity": 0.0}, "sparsity"), ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.5}, "sparsity"),
    ({"sparsity": "0.9"}, "sparsity"), ({"delta": 0}, "delta"), ({"delta": -3}, "delta"),
    ({"t_end": 0}, "t_end"), ({"t_end": -10}, "t_end"), ({"t_end": None}, "t_end"),
    ({"ablation": 2.0}, "ablation"), ({"distribution": "normal"}, "distribution"),
    ({"dense_layers": ["nope"]}, "dense_layers"),
])
def test_bad_arguments_are_clear_errors(kw, match):
    model = tiny_cnn()
    opt = make_opt(model, "sgd")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SemisparseError, match=match):
        ss.SRigL(model, opt, **{"sparsity": 0.9, "t_end": 100, **kw})
    assert model.state_dict().keys() == before.keys()  # model untouched


def test_optimizer_without_the_models_parameters_is_an_error():
    model = tiny_cnn()
    other = tiny_cnn()
    with pytest.raises(SemisparseError, match="optimizer does not hold"):
        ss.RigL(model, torch.optim.SGD(other.parameters(), lr=0.1), sparsity=0.9, t_end=10)
    with pytest.raises(SemisparseError, match="optimizer does not hold"):
        ss.SRigL(model, torch.optim.SGD(model[9].parameters(), lr=0.1), sparsity=0.9, t_end=10)
    with pytest.raises(SemisparseError, match="optimizer"):
        ss.SRigL(model, "sgd", sparsity=0.9, t_end=10)
    assert not ss.masks(model)


def test_already_sparsified_model_is_an_error():
    model = tiny_cnn()
    ss.sparsify(model, 0.5)
    with pytest.raises(SemisparseError, match="already sparsified"):
        ss.SRigL(model, make_opt(model, "sgd"), sparsity=0.9, t_end=10)


def test_from_flags_checks_cli_contradictions():
    model = tiny_cnn()
    opt = make_opt(model, "sgd")
    with pytest.raises(SemisparseError, match="gumbel_2x4"):
        from_flags(model, opt, "srigl", 100, masking="gumbel_2x4")
    with pytest.raises(SemisparseError, match="t-end"):
        from_flags(model, opt, "srigl", 100, t_end=1.5)
    with pytest.raises(SemisparseError, match="--dst"):
        from_flags(model, opt, "set", 100)
    sched = from_flags(model, opt, "rigl", 200, sparsity_level=0.8, t_end=0.5, delta=10, ignore_linear=True)
    assert sched.schedule.t_end == 100 and sched.method == "rigl"
    assert set(ss.masks(model)) == {"0.weight", "3.weight"}


def test_grad_steps_sums_the_dense_gradient_over_the_last_steps_before_an_update():
    torch.manual_seed(0)
    model = nn.Linear(20, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = ss.RigL(model, opt, sparsity=0.75, delta=3, t_end=1000, distribution="uniform", grad_steps=2)
    mask = sched.layers[0].mask.mask.clone()
    w = sched.layers[0].original.detach().clone()
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(6, 20, generator=gen) for _ in range(3)]
    assert not _dense_grad_step(model, sched, opt, [grads[0]])  # step 1: not recorded (update at 3)
    assert all(not g.any() for g in sched._dense_grads.values())
    assert not _dense_grad_step(model, sched, opt, [grads[1]])  # step 2: recorded
    state = copy.deepcopy(sched.state_dict())  # resume mid-window keeps the partial sum
    sched.load_state_dict(state)
    assert _dense_grad_step(model, sched, opt, [grads[2]])  # step 3: recorded, update
    frac = sched.schedule.drop_fraction(3)
    n_active = int(mask.sum())
    n_drop = int(n_active * frac)
    kept = torch.zeros(120, dtype=torch.bool)
    kept[torch.topk(torch.where(mask, w.abs(), torch.tensor(-1.0)).reshape(-1), n_active - n_drop).indices] = True
    dense = (grads[1] + grads[2]).abs().reshape(-1)
    expect = torch.topk(torch.where(kept, torch.tensor(-1.0), dense), n_drop).indices
    new = sched.layers[0].mask.mask.reshape(-1)
    assert sorted((new & ~kept).nonzero().flatten().tolist()) == sorted(expect.tolist()) and n_drop > 0
    assert not sched._dense_grads


def test_factories_are_a_rule_a_budget_and_a_schedule_composed():
    a = tiny_cnn()
    b = copy.deepcopy(a)
    made = ss.SRigL(a, make_opt(a, "sgd"), sparsity=0.8, t_end=50, delta=5, ablation=0.2, seed=1)
    composed = DynamicSparsity(b, make_opt(b, "sgd"), ConstantFanIn(0.2), LayerBudget(0.8), UpdateSchedule(5, 50),
                               seed=1)
    ma, mb = ss.masks(a), ss.masks(b)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert made.state_dict()["layers"] == composed.state_dict()["layers"] and composed.method == "srigl"
