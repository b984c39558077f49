"""Leaving a process group: barrier then destroy, the group really freed, so a finished run exits with 0.

The abort these pin down: a gloo group that outlives ``cleanup`` keeps its worker threads; one
still releasing the last gradient all-reduce when the interpreter exits needs the GIL, Python ends that
thread, and the unwind through a noexcept destructor calls std::terminate (SIGABRT, by chance, under load).
"""

import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers.gloo_ranks import run_ranks
from semisparse.train import distributed


@pytest.fixture
def fake_group(monkeypatch):
    """A two-rank group that only records what is done with it."""
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: "destroy" not in calls)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: calls.append("destroy"))
    return calls


def test_cleanup_meets_every_rank_at_a_barrier_then_destroys_the_group(fake_group):
    distributed.cleanup()
    assert fake_group == ["barrier", "destroy"]
    distributed.cleanup()  # a second call finds no group: nothing more
    assert fake_group == ["barrier", "destroy"]


def test_cleanup_while_an_error_unwinds_destroys_without_waiting_for_peers(fake_group):
    with pytest.raises(ValueError, match="data error"):
        try:
            raise ValueError("data error on this rank")
        finally:
            distributed.cleanup()  # the peers may never reach a barrier: do not wait for them
    assert fake_group == ["destroy"]


def test_cleanup_destroys_the_group_even_when_the_barrier_fails(fake_group, monkeypatch):
    def lost_peer(*a, **k):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "barrier", lost_peer)
    with pytest.raises(RuntimeError, match="Connection closed"):
        distributed.cleanup()
    assert fake_group == ["destroy"]


def test_init_imports_the_collectives_whose_defaults_would_pin_the_group_before_the_group_exists(monkeypatch):
    # Imported after init_process_group, torch.distributed.nn.functional's `group=group.WORLD` defaults hold
    # the default group for good, and destroy_process_group can no longer free it (nor join its threads).
    monkeypatch.delitem(sys.modules, "torch.distributed.nn.functional", raising=False)
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda *a, **k: seen.append("torch.distributed.nn.functional" in sys.modules))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = distributed.init_distributed("cpu", "file:///nonexistent")
    assert seen == [True] and (info.rank, info.world_size) == (1, 2)


def _slow_rank_worker(rank: int, world: int, out_dir: str) -> None:
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(8, 4))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    ddp(x).sum().backward()  # the last all-reduce: its work holds backward's Python context
    if rank == 1:
        time.sleep(0.5)  # reaches teardown late: rank 0 waits at the barrier, its group alive meanwhile
    torch.save(ddp.module.weight.grad, f"{out_dir}/grad{rank}.pt")


@pytest.mark.slow
def test_a_rank_slow_to_reach_teardown_still_leaves_cleanly(tmp_path):
    # run_ranks fails a rank whose group or gloo threads outlive cleanup(); both processes must exit with 0.
    run_ranks(_slow_rank_worker, 2, tmp_path, str(tmp_path))
    g0, g1 = (torch.load(tmp_path / f"grad{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(g0, g1)  # the ranks' different inputs, averaged
