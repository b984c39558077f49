"""Mixed precision done right: a step whose gradients overflowed (the GradScaler skips ``optimizer.step``)
is no step for the sparsity schedules, and no topology is ever computed from non-finite gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import semisparse as ss
from semisparse.dst import DSTSettings
from semisparse.masking.gumbel import learned_masks
from semisparse.train.engine import train_one_epoch
from semisparse.train.sparsity import SparsityConfig, TrainingSparsity


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, factor: float = 1.0) -> None:
    (F.cross_entropy(model(x), y) * factor).backward()


@pytest.mark.parametrize("factory", [ss.RigL, ss.SRigL])
def test_update_from_non_finite_captured_gradients_changes_nothing(factory):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = factory(model, opt, sparsity=0.5, delta=1, t_end=100, distribution="uniform")
    before = {k: v.clone() for k, v in ss.masks(model).items()}
    weights = copy.deepcopy(model.state_dict())
    x, y = torch.randn(8, 16), torch.randint(0, 8, (8,))
    backward(model, x, y, factor=float("inf"))  # an overflowed backward: inf/NaN everywhere
    assert not sched.step()  # an update step, refused
    assert all(torch.equal(ss.masks(model)[k], before[k]) for k in before)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    assert sched.step_count == 1  # the optimizer did step (no scaler here): counted
    opt.zero_grad()
    backward(model, x, y)  # a finite gradient: the next update goes ahead
    assert sched.step()
    assert any(not torch.equal(ss.masks(model)[k], before[k]) for k in before)


def test_a_step_the_optimizer_skipped_is_not_counted_and_its_gradients_are_dropped():
    """The run with a skipped overflow step in the middle equals the run without it."""
    runs = []
    for with_overflow in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = ss.RigL(model, opt, sparsity=0.5, delta=2, t_end=100, distribution="uniform")
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 8, (8,), generator=g)) for _ in range(2)]
        backward(model, *batches[0])
        assert not sched.step()  # step 1: capture for the update at step 2 begins
        opt.zero_grad()
        if with_overflow:
            backward(model, *batches[1], factor=float("inf"))
            assert not sched.step(stepped=False)  # skipped by the scaler: not counted, gradients dropped
            assert sched.step_count == 1
            assert all(not b.any() for b in sched._dense_grads.values())
            opt.zero_grad()
        backward(model, *batches[1])
        assert sched.step()  # step 2 is the update, from finite gradients only
        runs.append(ss.masks(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


OVERFLOWING = (2, 5, 6)  # batches whose loss, times the scale, overflows fp32


def overflow_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", growth_interval=10_000)


def loader(n_batches: int = 10) -> DataLoader:
    """Batches of 8; the ``OVERFLOWING`` ones have inputs of 1e36 (finite losses, scaled gradients inf)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches, 8, 16, generator=g)
    x[list(OVERFLOWING)] *= 1e36
    y = torch.randint(0, 8, (n_batches * 8,), generator=g)
    return DataLoader(TensorDataset(x.reshape(-1, 16), y), batch_size=8)


def count_real_steps(opt: torch.optim.Optimizer) -> list[int]:
    calls = [0]
    opt.register_step_post_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("dst", ["rigl", "srigl", "sr-ste"])
def test_engine_counts_only_optimizer_steps_that_happened_for_dst(dst):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsity = TrainingSparsity(SparsityConfig(method="none", dst=DSTSettings(
        dst, sparsity=0.5, delta=1, t_end_fraction=1.0, distribution="uniform",
        pattern="2:4" if dst == "sr-ste" else None)))
    sparsity.attach(model, opt, total_steps=10)
    real = count_real_steps(opt)
    out = train_one_epoch(model, nn.CrossEntropyLoss(), opt, loader(), scaler=overflow_scaler(), sparsity=sparsity,
                          show_progress=False)  # fmt: skip
    assert real[0] == 10 - len(OVERFLOWING)  # the overflowed steps were skipped by the scaler
    assert out["step"] == real[0] == sparsity.step == sparsity.dst.step_count
    ss.check(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_engine_keeps_learned_masks_at_the_optimizer_step_position_across_skipped_steps():
    model = mlp()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=20, trainable="all")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsity = TrainingSparsity(SparsityConfig(method="gumbel", pattern="2:4"))
    sparsity._model = model
    real = count_real_steps(opt)
    out = train_one_epoch(model, nn.CrossEntropyLoss(), opt, loader(), scaler=overflow_scaler(), sparsity=sparsity,
                          show_progress=False)  # fmt: skip
    assert real[0] == 10 - len(OVERFLOWING)
    assert out["step"] == real[0]
    assert all(int(p.step) == real[0] and p._host_step == real[0] for p in learned_masks(model))
