"""SRigL/RigL under DDP (2 gloo processes on CPU): masks identical on both ranks, equal to one process on the
whole batch, and growth uses the dense gradient averaged over the ranks."""

import os

import torch
import torch.nn.functional as F
from torch import nn

import semisparse as ss
from helpers.gloo_ranks import run_ranks

STEPS, DELTA = 8, 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(STEPS)]


def _train(model, opt, sched, data):
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ss.check(model)


def _hand_grads(rank):
    return torch.randn(6, 20, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank: int, world: int, out_dir: str) -> None:
    wrapped = nn.parallel.DistributedDataParallel(_model())
    try:  # parametrizing after DDP is built would hide the gradients from DDP: a clear error
        ss.SRigL(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), sparsity=0.8, t_end=STEPS)
        raise AssertionError("a DDP-wrapped model must be refused")
    except ss.SemisparseError as e:
        assert "before wrapping it in DistributedDataParallel" in str(e)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = ss.SRigL(model, opt, sparsity=0.8, delta=DELTA, t_end=STEPS, ablation=0.3)
    ddp = nn.parallel.DistributedDataParallel(model)
    half = 8 // world
    data = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in _data()]
    _train(ddp, opt, sched, data)
    out = {k: v.detach() for k, v in model.state_dict().items()}

    # Hand-set gradients: rank r backpropagates G_r through the effective weight.
    torch.manual_seed(0)
    lin = nn.Linear(20, 6)
    opt2 = torch.optim.SGD(lin.parameters(), lr=0.0)
    s2 = ss.RigL(lin, opt2, sparsity=0.75, delta=1, t_end=1000, distribution="uniform")
    out["hand.mask_before"] = s2.layers[0].mask.mask.clone()
    out["hand.w"] = s2.layers[0].original.detach().clone()
    (lin.weight * _hand_grads(rank)).sum().backward()
    opt2.step()
    s2.step()
    out["hand.mask_after"] = s2.layers[0].mask.mask.clone()
    out["hand.frac"] = torch.tensor(s2.schedule.drop_fraction(1))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_gloo_ranks_identical_masks_and_averaged_dense_gradient(tmp_path):
    run_ranks(_worker, 2, tmp_path, str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k

    # One process on the whole batch makes the same masks (DDP averages gradients, so does the capture).
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = ss.SRigL(model, opt, sparsity=0.8, delta=DELTA, t_end=STEPS, ablation=0.3)
    _train(model, opt, sched, _data())
    for k, v in model.state_dict().items():
        if k.endswith(".mask"):
            assert torch.equal(v, r0[k]), k
        else:
            assert torch.allclose(v, r0[k], atol=1e-5), k

    # Growth = topk(|mean over ranks of G_r|) over the positions inactive after the drop.
    mask, w, frac = r0["hand.mask_before"], r0["hand.w"], float(r0["hand.frac"])
    n_active = int(mask.sum())
    n_drop = int(n_active * frac)
    kept = torch.zeros(mask.numel(), dtype=torch.bool)
    kept[torch.topk(torch.where(mask, w.abs(), torch.tensor(-1.0)).reshape(-1), n_active - n_drop).indices] = True
    dense = ((_hand_grads(0) + _hand_grads(1)) / 2).abs().reshape(-1)
    expect = torch.topk(torch.where(kept, torch.tensor(-1.0), dense), n_drop).indices
    grown = (r0["hand.mask_after"].reshape(-1) & ~kept).nonzero().flatten()
    assert sorted(grown.tolist()) == sorted(expect.tolist()) and n_drop > 0
    # ... and differs from either rank's own gradient alone.
    own = torch.topk(torch.where(kept, torch.tensor(-1.0), _hand_grads(0).abs().reshape(-1)), n_drop).indices
    assert sorted(own.tolist()) != sorted(expect.tolist())
