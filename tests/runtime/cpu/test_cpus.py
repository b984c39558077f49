"""Deployed models use the CPUs the process has at call time (affinity, cgroup quota, busy neighbours) for their
kernels and their torch ops, and never spin against themselves."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import semisparse as ss
from helpers import paths
from semisparse.runtime import deploy
from semisparse.runtime.cpu import cpus, kernels

needs_two_cpus = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                    reason="needs CPU affinity control and at least two CPUs")

STAT = """cpu  400 0 100 900 10 0 0 0 0 0
cpu0 100 0 50 300 5 0 0 0 0 0
cpu1 200 0 30 200 5 0 0 20 0 0
cpu2 100 0 20 400 0 0 0 0 0 0
intr 1 2 3
"""


def _pin_process(cpu_set) -> None:
    """What ``taskset`` or a container's CPU set does: every thread of the process (OpenMP's included)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpu_set)
        except OSError:
            pass


def _fresh(monkeypatch, load: bool = False) -> None:
    """Forget the cached readings (the next call re-reads them); ``load=False``: ignore other processes' load
    (this machine is shared: those tests are about affinity)."""
    for key in ("affinity_at", "quota_at", "load_at", "next_at"):
        monkeypatch.setitem(cpus._cache, key, -1.0)
    monkeypatch.setitem(cpus._cache, "sample", None)
    monkeypatch.setitem(cpus._cache, "free", None)
    if not load:
        monkeypatch.setattr(cpus, "free_cpus", lambda cpu_set, now: None)


def test_busy_seconds_count_the_given_cpus_without_idle_and_iowait():
    tick = cpus._TICK_S
    assert cpus.busy_seconds(STAT, frozenset({0})) == pytest.approx(150 * tick)
    assert cpus.busy_seconds(STAT, frozenset({1, 2})) == pytest.approx((250 + 120) * tick)  # steal counts as busy
    assert cpus.busy_seconds(STAT, frozenset({7})) == 0


def test_free_cpus_leave_out_the_processs_own_cpu_time(monkeypatch):
    tick = cpus._TICK_S
    texts = iter([STAT, STAT.replace("cpu0 100 0 50", "cpu0 170 0 50").replace("cpu1 200", "cpu1 250")])
    monkeypatch.setattr(cpus, "_read_stat", lambda: next(texts))
    own = iter([10.0, 10.0 + 40 * tick])  # of the 120 ticks used on cpus 0 and 1 in the second, 40 were ours
    monkeypatch.setattr(cpus.time, "process_time", lambda: next(own))
    monkeypatch.setitem(cpus._cache, "sample", None)
    assert cpus.free_cpus(frozenset({0, 1}), 5.0) is None  # one sample: nothing to compare yet
    assert cpus.free_cpus(frozenset({0, 1}), 5.01) is None  # a window shorter than a few ticks says nothing
    assert cpus.free_cpus(frozenset({0, 1}), 6.0) == pytest.approx(2 - 80 * tick)


@pytest.mark.parametrize("hierarchy", ["v1", "v2"])
def test_cgroup_quota_is_the_tightest_of_the_cgroup_and_its_parents(tmp_path, hierarchy):
    if hierarchy == "v2":
        (tmp_path / "a" / "b").mkdir(parents=True)
        (tmp_path / "cpu.max").write_text("max 100000\n")
        (tmp_path / "a" / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs: 2 threads
        (tmp_path / "a" / "b" / "cpu.max").write_text("max 100000\n")
        text = "0::/a/b\n"
    else:
        d = tmp_path / "cpu,cpuacct" / "a"
        d.mkdir(parents=True)
        (d / "cpu.cfs_quota_us").write_text("150000\n")
        (d / "cpu.cfs_period_us").write_text("100000\n")
        text = "4:memory:/x\n3:cpu,cpuacct:/a\n"
    assert cpus.quota_cpus(tmp_path, text) == (2 if hierarchy == "v2" else 1)
    assert cpus.quota_cpus(tmp_path, "0::/elsewhere\n") is None
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still runs one thread
    assert cpus.quota_cpus(tmp_path, "0::/\n") == 1


@pytest.mark.parametrize("hierarchy", ["v1", "v2"])
def test_cgroup_cpuset_and_cpu_lists(tmp_path, hierarchy):
    assert cpus.cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert cpus.cpu_list("") is None and cpus.cpu_list("zero") is None and cpus.cpu_list(None) is None
    if hierarchy == "v2":
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "cpuset.cpus.effective").write_text("2-3\n")
        text = "0::/a\n"
    else:
        (tmp_path / "cpuset" / "a").mkdir(parents=True)
        (tmp_path / "cpuset" / "a" / "cpuset.cpus").write_text("5,7\n")
        text = "4:memory:/x\n3:cpuset:/a\n"
    assert cpus.cgroup_cpuset(tmp_path, text) == ({2, 3} if hierarchy == "v2" else {5, 7})
    assert cpus.cgroup_cpuset(tmp_path, "0::/elsewhere\n") is None


def test_usable_is_capped_by_quota_and_by_what_others_leave_free(monkeypatch):
    _fresh(monkeypatch, load=True)
    monkeypatch.setattr(cpus, "affinity_set", lambda: frozenset(range(8)))
    monkeypatch.setattr(cpus, "quota_cpus", lambda: 6)
    monkeypatch.setattr(cpus, "free_cpus", lambda cpu_set, now: 4.8)  # others took 3.2 of the 8 CPUs
    assert cpus.usable() == 5  # 4.8 free: the fifth thread's CPU is 80% free, within the margin
    monkeypatch.setattr(cpus, "free_cpus", lambda cpu_set, now: 0.3)
    cpus.refresh()
    assert cpus.usable() == 1  # never less than one


@needs_two_cpus
def test_pinned_after_planning_batch1_call_stays_within_3x_of_unpinned(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(3072, 768)
    ss.sparsify(lin, 0.9)
    dep = deploy(lin, plan="condensed")  # planned on both CPUs; the kernels run whatever the machine's load
    x = torch.randn(1, 3072)
    every = os.sched_getaffinity(0)
    before = torch.get_num_threads()

    def block(n=40):
        for _ in range(5):
            dep(x)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            dep(x)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    unpinned, one_thread, pinned = [], [], []
    try:
        with torch.no_grad():
            for _ in range(4):  # interleaved: a slow spell of this shared machine hits all three alike
                unpinned.append(block())
                torch.set_num_threads(1)
                one_thread.append(block())
                torch.set_num_threads(before)
                _pin_process({min(every)})
                time.sleep(cpus.AFFINITY_EVERY_S)  # as a deployed model notices on its own
                pinned.append(block())
                _pin_process(every)
                time.sleep(cpus.AFFINITY_EVERY_S)
    finally:
        _pin_process(every)
        torch.set_num_threads(before)
    t_unpinned, t_one, t_pinned = (statistics.median(t) for t in (unpinned, one_thread, pinned))
    # against its unpinned latency, and against the best it can do on one CPU unpinned (on a machine busy
    # enough that two threads never run together the unpinned call is slow too, and would hide a collapse)
    assert t_pinned <= 3 * min(t_unpinned, t_one), (t_unpinned, t_one, t_pinned)


@needs_two_cpus
def test_pinned_deployed_call_runs_torch_ops_and_kernels_on_one_thread_and_gives_threads_back(monkeypatch):
    _fresh(monkeypatch)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    ss.sparsify(model, 0.5, include=["0", "4"])  # the middle conv stays a torch conv
    dep = deploy(model, plan="condensed")
    seen = []
    dep[2].register_forward_pre_hook(lambda mod, args: seen.append(torch.get_num_threads()))
    every = os.sched_getaffinity(0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # whatever an earlier test left: the call must go down to one and back to two
    x = torch.randn(1, 3, 10, 10)
    try:
        with torch.no_grad():
            dep(x)
            _pin_process({min(every)})
            cpus.refresh()
            y = dep(x)
            assert torch.get_num_threads() == 2  # given back after the call
            if kernels.available():
                assert kernels.library().ss_max_threads() == 1  # what the kernels last ran with
            _pin_process(every)
            cpus.refresh()
            dep(x)
    finally:
        _pin_process(every)
        torch.set_num_threads(before)
    assert seen == [2, 1, 2]  # the torch conv inside ran on the CPUs the process had at each call
    torch.testing.assert_close(y, model.eval()(x), rtol=1e-5, atol=1e-5)


def test_thread_count_is_given_back_when_the_call_raises(monkeypatch):
    _fresh(monkeypatch)
    monkeypatch.setattr(cpus, "affinity_set", lambda: frozenset({0}))
    lin = nn.Linear(8, 4)
    ss.sparsify(lin, 0.5)
    dep = deploy(lin, plan="condensed")
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        dep(torch.randn(2, 5))
    assert torch.get_num_threads() == before


@needs_two_cpus
def test_a_busy_neighbour_on_one_cpu_leaves_one_thread(monkeypatch):
    _fresh(monkeypatch, load=True)
    every = sorted(os.sched_getaffinity(0))
    mine = set(every[:2])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, {every[1]})
        _pin_process(mine)
        monkeypatch.setattr(cpus, "LOAD_EVERY_S", 0.2)
        time.sleep(0.1)
        cpus.usable()  # first sample
        time.sleep(0.25)
        cpus.refresh()
        assert cpus.usable() == 1, cpus._cache["free"]  # the neighbour took one of the two
    finally:
        busy.kill()
        busy.wait()
        _pin_process(set(every))


_BOUND_PROBE = """
import json, torch
from semisparse.runtime.cpu import cpus
print(json.dumps({"set": sorted(cpus.affinity_set()), "usable": cpus.usable(), "quota": cpus.quota_cpus(),
                  "threads": cpus.threads_now(), "torch": torch.get_num_threads()}))
"""


@needs_two_cpus
@pytest.mark.parametrize("env", [{"OMP_PROC_BIND": "true"}, {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"},
                                 {"GOMP_CPU_AFFINITY": "this process's CPUs"}])
def test_openmp_thread_binding_does_not_shrink_the_process_to_one_cpu(env):
    """OpenMP's binding (``OMP_PROC_BIND``, the usual advice for HPC) pins the initial thread to one CPU when torch
    loads it. The thread's affinity then says one CPU, and every deployed call ran one thread (ResNet-50 SRigL
    39 ms instead of 23 on two CPUs): the CPUs are OpenMP's places."""
    import json

    if any(k in os.environ for k in ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")):
        pytest.skip("this process itself runs with OpenMP binding")
    if "GOMP_CPU_AFFINITY" in env:  # libgomp takes the list as given, even CPUs the process may not use
        env = {"GOMP_CPU_AFFINITY": ",".join(map(str, sorted(os.sched_getaffinity(0))))}
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    src = str(paths.SRC)
    base["PYTHONPATH"] = os.pathsep.join([src, base.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _BOUND_PROBE], env={**base, **env}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = sorted(os.sched_getaffinity(0))
    assert got["set"] == expected
    cap = min(len(expected), got["quota"] or len(expected))
    assert got["usable"] == cap  # the first reading has no load window yet: affinity and quota only
    assert got["threads"] == min(cap, got["torch"])
