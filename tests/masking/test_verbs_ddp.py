"""A sparsified model trains under DDP (2 gloo processes on CPU): masks hold, ranks agree, equals 1 process."""

import os

import torch
from torch import nn

import semisparse as ss
from helpers.gloo_ranks import run_ranks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)


def _train(model, x, y, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank: int, world: int, out_dir: str) -> None:
    model = _model()
    ss.sparsify(model, "2:4")
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = _data()
    half = x.shape[0] // world
    _train(ddp, x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half])
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_gloo_ranks_keep_masks_and_match_single_process(tmp_path):
    run_ranks(_worker, 2, tmp_path, str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)

    single = _model()
    ss.sparsify(single, "2:4")
    _train(single, *_data())  # same global batch of 8: DDP averages the two halves' gradients
    ref = single.state_dict()
    for k in ref:
        assert torch.allclose(r0[k].float(), ref[k].float(), atol=1e-6), k
    mask = r0["0.parametrizations.weight.0.mask"]
    assert bool((mask.reshape(32, 4, 4).sum(-1) == 2).all())
