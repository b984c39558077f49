"""Seeded fuzzing of compressed-file headers and training checkpoints (resealed, so the digest passes and only
the readers' own checks stand): every variant is refused in one line, or loads into a model equal to what its
contents describe (and a resume's checks that accept it leave an optimizer, schedule and RNG that step)."""

from __future__ import annotations

import copy
import json
import math
import random
import sys

import pytest
import torch

import semisparse as ss
from helpers.resave import resave
from helpers.tiny_registry import registry, sparse_tiny, tiny  # noqa: F401 - registry: autouse fixture
from semisparse.io import compressed as ck
from semisparse.io.digest import seal
from semisparse.masking.parametrization import effective_state_dict, split_state_dict
from semisparse.train.checkpoint import (
    atomic_save,
    check_resumable,
    load_training_checkpoint,
    rng_state,
    set_rng_state,
)

VALUES = [None, True, 0, -1, 1, 3, 2**40, -(2**63), 1.5, float("nan"), float("inf"), 1e308, "", "x", "2:4",
          "float16", [], [1, 2], [[1]], {}, {"n": 2}]  # fmt: skip


def _paths(obj, prefix=()):
    """Every (container, key) path inside nested dicts / lists (tensors are leaves)."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append((*prefix, k))
        out.extend(_paths(v, (*prefix, k)))
    return out


def _mutate(obj, rng: random.Random, tensors: bool = False) -> str:
    """One random edit of ``obj`` in place: a value replaced, a key removed or added; returns what it did."""
    paths = _paths(obj)
    path = rng.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    old = parent[key]
    op = rng.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[key]
        return f"del {path}"
    if op < 0.25 and isinstance(parent, dict):
        parent[rng.choice(["junk", "extra", str(key) + "_"])] = rng.choice(VALUES)
        return f"add beside {path}"
    if tensors and isinstance(old, torch.Tensor) and rng.random() < 0.7:
        new = old.clone(memory_format=torch.contiguous_format)
        kind = rng.randrange(4)
        if kind == 0 and new.numel():
            new.view(-1)[rng.randrange(new.numel())] = rng.choice([float("nan"), 1e30, -1, 0, 255])
        elif kind == 1:
            new = new.reshape(-1)[: max(0, new.numel() - 1)]
        elif kind == 2:
            new = new.to(rng.choice([torch.float16, torch.int64, torch.bool, torch.uint8]))
        else:
            new = torch.zeros(*(d + 1 for d in new.shape), dtype=new.dtype)
        parent[key] = new
        return f"tensor {path} ({kind})"
    parent[key] = copy.deepcopy(rng.choice(VALUES))
    return f"set {path}"


def _one_line(exc: BaseException) -> None:
    assert isinstance(exc, ss.SemisparseError), repr(exc)
    assert len(str(exc).splitlines()) == 1 and str(exc).strip(), str(exc)


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal shape and values, ``y`` in ``x``'s dtype as loading converts it (NaN equal to NaN)."""
    if x.shape != y.shape:
        return False
    y = y.to(x.dtype)
    if x.is_floating_point():
        return bool(((x == y) | (x.isnan() & y.isnan())).all())
    return torch.equal(x, y)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    from semisparse import models

    models.MODELS["tiny"] = tiny  # the module-scoped copy of the registry entry
    folder = tmp_path_factory.mktemp("fuzz")
    paths = {}
    for pattern in ("2:4", ss.FanIn(0.5) if hasattr(ss, "FanIn") else "2:4"):
        model = sparse_tiny(pattern)
        name = f"{pattern}".replace(":", "of").replace("(", "").replace(")", "").replace(" ", "")
        paths[name] = (ck.save(model, folder / f"{name}.safetensors"), effective_state_dict(model.state_dict()))
    return paths


@pytest.mark.parametrize("seed", range(4))
def test_fuzzed_compressed_headers_are_refused_in_one_line_or_load_what_they_describe(compressed, tmp_path, seed):
    rng = random.Random(seed)
    accepted = 0
    for i in range(40):
        name = rng.choice(sorted(compressed))
        path, expected = compressed[name]

        what: list[str] = []

        def edit(h, what=what):
            for _ in range(rng.choice([1, 1, 2])):
                what.append(_mutate(h, rng))

        out = resave(path, tmp_path / f"{i}.safetensors", edit_header=edit, digest_of=ck._file_digest)
        try:
            model = ss.load(out)
        except Exception as exc:  # noqa: BLE001 - asserted to be a one-line SemisparseError
            _one_line(exc)
            continue
        accepted += 1
        got = effective_state_dict(model.state_dict())
        # accepted: the model is what the (unchanged) tensors describe, whatever the edit was
        assert _same(got, expected), what
        for key, mask in ss.masks(model).items():
            assert torch.equal(mask, got[key] != 0) or bool((got[key][mask] == 0).any()), (what, key)
    assert accepted < 40  # the fuzzing reached the checks


def _training_checkpoint() -> dict:
    torch.manual_seed(0)
    model = sparse_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    sched.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
            "epoch": 0, "step": 1, "args": {"lr": 0.1, "opt": "sgd", "dense_layers": ["a"]},
            "arch": dict(model.semisparse_arch),
            "sparsity": {"pattern": "2:4", "method": "magnitude", "masks": ss.masks(model), "state": None},
            "rng": rng_state()}  # fmt: skip


def _described(ckpt: dict) -> dict:
    """The effective weights a checkpoint's contents describe: dense weights times the masks it records."""
    dense, found = split_state_dict(ckpt["model"])
    masks = (ckpt.get("sparsity") or {}).get("masks") or found
    return {k: v * masks[k].to(torch.bool).to(v.dtype) if k in masks else v for k, v in dense.items()}


@pytest.mark.parametrize("seed", range(4))
def test_fuzzed_training_checkpoints_are_refused_in_one_line_or_load_what_they_describe(tmp_path, seed):
    rng = random.Random(1000 + seed)
    base = _training_checkpoint()
    accepted = resumable = refused = 0
    torch_state = torch.get_rng_state()
    for i in range(30):
        ckpt = copy.deepcopy(base)
        what = [_mutate(ckpt, rng, tensors=True) for _ in range(rng.choice([1, 1, 2]))]
        path = tmp_path / f"{i}.pth"
        try:
            atomic_save(seal(ckpt), str(path))
        except (ss.SemisparseError, TypeError, ValueError):
            continue  # not a value a checkpoint can hold
        try:
            model, _ = load_training_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - asserted to be a one-line SemisparseError
            _one_line(exc)
            refused += 1
            continue
        accepted += 1
        loaded = torch.load(path, weights_only=True)
        got = effective_state_dict(model.state_dict())
        assert _same(got, _described(loaded)), what
        # a resume's checks: refused in one line, or the optimizer, schedule and RNG it restores step
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
        try:
            check_resumable(loaded, path, opt, sched)
        except Exception as exc:  # noqa: BLE001
            _one_line(exc)
            refused += 1
            continue
        resumable += 1
        opt.load_state_dict(loaded["optimizer"])
        if loaded.get("lr_scheduler") is not None:
            sched.load_state_dict(loaded["lr_scheduler"])
        model(torch.randn(2, 1, 8, 8)).sum().backward()
        opt.step()
        sched.step()
        assert all(math.isfinite(g["lr"]) for g in opt.param_groups), what
        if loaded.get("rng") is not None:
            set_rng_state(loaded["rng"])
    torch.set_rng_state(torch_state)
    assert refused > 0 and resumable > 0 and accepted > 0  # the fuzzing reached the checks
    assert sys.getrecursionlimit() >= 1000


def test_the_fuzzers_edits_reach_json_and_tensors():
    rng = random.Random(0)
    header = {"a": {"b": [1, 2]}, "c": "x"}
    seen = {_mutate(json.loads(json.dumps(header)), rng).split()[0] for _ in range(50)}
    assert {"set", "del", "add"} <= seen
