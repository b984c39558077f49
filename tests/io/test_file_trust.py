"""Files a user can trust: every read checks a digest, a failed load changes nothing, a
file's header cannot make a load open another file or allocate more than its tensors, load errors are one line.
"""

from __future__ import annotations

import json
import os
import random
import sys
import warnings

import pytest
import torch
from torch import nn

import semisparse as ss
from helpers.resave import resave
from helpers.threads import one_thread  # noqa: F401 - autouse: one torch thread here
from helpers.tiny_registry import BUILT_ON, registry, sparse_tiny, tiny  # noqa: F401 - registry: autouse fixture
from semisparse import models
from semisparse.cli import main as cli
from semisparse.io import compressed as ck
from semisparse.io import files as io_files
from semisparse.masking import parametrization_of
from semisparse.train import run_folder
from semisparse.train.checkpoint import atomic_save, load_checkpoint, load_training_checkpoint


def training_checkpoint(model: nn.Module, pattern="2:4", **extra) -> dict:
    return {"model": model.state_dict(), "optimizer": {}, "lr_scheduler": None, "epoch": 3, "step": 30,
            "args": {"lr": 0.1, "opt": "sgd"}, "arch": dict(model.semisparse_arch),
            "sparsity": {"pattern": pattern, "method": "magnitude", "masks": ss.masks(model)}, **extra}  # fmt: skip


@pytest.fixture
def ckpt_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    atomic_save(training_checkpoint(sparse_tiny()), str(path))
    return path


def one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    rc = cli(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if not ln.startswith(("semisparse: note:", "semisparse: warning:"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def state_and_masks(model: nn.Module):
    """Everything a failed load must leave as it was: the state_dict and each parametrization."""
    params = {}
    for key in ss.masks(model):
        p = parametrization_of(model, key)
        params[key] = (type(p), p.target, p.layout, p.hard_mask().clone())
    return {k: v.clone() for k, v in model.state_dict().items()}, params


def assert_unchanged(model, before):
    state, params = state_and_masks(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert params.keys() == before[1].keys()
    for k, (cls, target, layout, mask) in params.items():
        b = before[1][k]
        assert (cls, target, layout) == b[:3] and torch.equal(mask, b[3]), k


# ---------------------------------------------------------------------- 1. a digest, checked on every read


def test_training_checkpoints_are_written_with_a_digest_of_everything(ckpt_file):
    from semisparse.io.digest import digest

    ckpt = torch.load(ckpt_file, weights_only=True)
    assert ckpt["digest"] == digest({k: v for k, v in ckpt.items() if k != "digest"})
    load_checkpoint(str(ckpt_file))  # verifies
    model, info = load_training_checkpoint(ckpt_file)
    assert info["pattern"] == "2:4" and ss.masks(model).keys() == ckpt["sparsity"]["masks"].keys()


def _value_changed(path, out, edit):
    """The issue's corruption: one entry changed, the file written again with the old digest kept."""
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, out)
    return out


EDITS = {
    "kept weight 1e30": lambda c: c["model"]["3.parametrizations.weight.original"].view(-1)[0].fill_(1e30),
    "args": lambda c: c["args"].update(lr=0.2),
    "epoch": lambda c: c.update(epoch=4),
    "sparsity pattern": lambda c: c["sparsity"].update(pattern="1:4"),
    "arch": lambda c: c["arch"].update(num_classes=11),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_changed_value_in_a_training_checkpoint_is_refused_by_every_reader(ckpt_file, tmp_path, capsys, edit):
    bad = _value_changed(ckpt_file, tmp_path / "bad.pth", EDITS[edit])
    for read in (lambda: load_checkpoint(str(bad)), lambda: load_training_checkpoint(bad),
                 lambda: models.load_weights(tiny(), bad)):  # --resume, report / export, --weights
        with pytest.raises(ss.SemisparseError, match="corrupted: its contents do not match the digest"):
            read()
    for argv in (["report", str(bad)], ["export", str(bad), "-o", str(tmp_path / "x.safetensors")]):
        assert "is corrupted" in one_line_error(argv, capsys)
    assert not (tmp_path / "x.safetensors").exists()


def _flipped(data: bytes, positions, tmp_path, name):
    for i in positions:
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        path = tmp_path / name
        path.write_bytes(bytes(flipped))
        yield i, path


def test_a_flipped_byte_anywhere_in_a_training_checkpoint_is_refused_or_changes_nothing(ckpt_file, tmp_path):
    data = ckpt_file.read_bytes()
    reference = state_and_masks(load_training_checkpoint(ckpt_file)[0])
    rng = random.Random(0)
    positions = sorted(rng.sample(range(len(data)), 150))
    refused = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a flip must not turn the file into one without a digest
        for i, path in _flipped(data, positions, tmp_path, "flip.pth"):
            try:
                model, _ = load_training_checkpoint(path)
            except ss.SemisparseError as exc:
                assert "\n" not in str(exc), (i, str(exc))
                refused += 1
            else:  # zip padding, a name's case: the same contents
                assert_unchanged(model, reference)
    assert refused > 100


def test_a_flipped_byte_anywhere_in_a_compressed_file_is_refused_or_changes_nothing(tmp_path):
    model = sparse_tiny(0.9)
    path = ck.save(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    reference = state_and_masks(ss.load(path))
    n = int.from_bytes(data[:8], "little")
    rng = random.Random(1)
    positions = sorted(rng.sample(range(8, 8 + n), 100) + rng.sample(range(8 + n, len(data)), 100))
    refused = 0
    for i, bad in _flipped(data, positions, tmp_path, "flip.safetensors"):
        try:
            loaded = ss.load(bad)
        except ss.SemisparseError as exc:
            assert "\n" not in str(exc), (i, str(exc))
            refused += 1
        else:  # JSON whitespace, safetensors' header padding: the same contents
            assert_unchanged(loaded, reference)
    assert refused > 150


@pytest.mark.parametrize("edit_tensors, edit_header", [
    (lambda t: t["3.weight::values"].view(-1)[0].fill_(1e30), None),
    (None, lambda h: h["arch"].update(num_classes=11)),  # the header is covered too
    (None, lambda h: h["layers"]["3.weight"].update(keep_dense=True)),
    (None, lambda h: h.update(dtype="float16")),
])  # fmt: skip
def test_a_changed_value_or_header_field_in_a_compressed_file_is_refused(tmp_path, capsys, edit_tensors, edit_header):
    path = ck.save(sparse_tiny(), tmp_path / "m.safetensors")
    bad = resave(path, tmp_path / "bad.safetensors", edit_tensors, edit_header)
    with pytest.raises(ss.SemisparseError, match="corrupted: its contents do not match the digest"):
        ss.load(bad)
    assert "is corrupted" in one_line_error(["report", str(bad)], capsys)


def test_files_without_a_digest_load_with_one_note(tmp_path, capsys):
    model = sparse_tiny()
    old = tmp_path / "old.pth"
    torch.save(training_checkpoint(model), old)  # as older semisparse wrote it
    with pytest.warns(ss.UnverifiedFileWarning, match="records no digest"):
        loaded, _ = load_training_checkpoint(old)
    assert ss.masks(loaded).keys() == ss.masks(model).keys()
    capsys.readouterr()
    assert cli(["report", str(old)]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(notes) == 1 and notes[0].startswith("semisparse: note: checkpoint") and "no digest" in notes[0]
    # torchvision weights (a plain state_dict) given to --weights
    plain = tmp_path / "tv.pth"
    torch.save(tiny().state_dict(), plain)
    with pytest.warns(ss.UnverifiedFileWarning):
        models.load_weights(tiny(), plain)
    # a compressed file of format 1 (its digest covers the tensors, not the header)
    v1 = resave(ck.save(model, tmp_path / "m.safetensors"), tmp_path / "v1.safetensors",
                 edit_header=lambda h: h.update(version=1), digest_of=lambda h, t: ck._digest(t))  # fmt: skip
    with pytest.warns(ss.UnverifiedFileWarning, match="older semisparse"):
        assert ss.masks(ss.load(v1)).keys() == ss.masks(model).keys()


# --------------------------------------------------------------------------- 3. a failed load changes nothing


@pytest.mark.parametrize("other", ["more classes", "another model"])
def test_a_failed_load_leaves_the_given_model_as_it_was(tmp_path, other):
    target = sparse_tiny("2:4")
    source = sparse_tiny(0.8, num_classes=12) if other == "more classes" else None
    if source is None:
        source = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        source.semisparse_arch = {"name": "tiny"}
        ss.sparsify(source, 0.5)
    compressed = ck.save(source, tmp_path / "other.safetensors")
    trained = tmp_path / "other.pth"
    atomic_save({"model": source.state_dict(), "sparsity": {"masks": ss.masks(source)}}, str(trained))
    before = state_and_masks(target)
    with pytest.raises(ss.SemisparseError):
        ss.load(compressed, model=target)
    assert_unchanged(target, before)
    with pytest.raises(ss.SemisparseError):
        load_training_checkpoint(trained, model=target)
    assert_unchanged(target, before)


def test_a_mask_for_a_weight_the_model_cannot_take_leaves_it_as_it_was(tmp_path):
    target = sparse_tiny("2:4")
    ckpt = training_checkpoint(target)
    ckpt["sparsity"]["masks"]["1.weight"] = torch.ones(16, dtype=torch.bool)  # BatchNorm's weight
    atomic_save(ckpt, str(tmp_path / "c.pth"))
    before = state_and_masks(target)
    with pytest.raises(ss.SemisparseError):
        load_training_checkpoint(tmp_path / "c.pth", model=target)
    assert_unchanged(target, before)


# ------------------------------------------------ 4. the header never names a file nor sizes the allocation


def test_a_header_naming_weights_is_refused_without_opening_them(tmp_path, monkeypatch):
    secret = tmp_path / "secret.pth"
    torch.save(tiny().state_dict(), secret)
    opened = []
    real = models.load_torch
    monkeypatch.setattr(models, "load_torch", lambda path, *a: opened.append(path) or real(path, *a))
    path = ck.save(sparse_tiny(), tmp_path / "m.safetensors")
    for arch_key, value in (("weights", str(secret)), ("pretrained", True)):
        extra = {arch_key: value}
        bad = resave(path, tmp_path / "bad.safetensors", edit_header=lambda h, e=extra: h["arch"].update(e),
                      digest_of=ck._file_digest)  # fmt: skip
        with pytest.raises(ss.SemisparseError, match=f"sets '{arch_key}', which a file may not set"):
            ss.load(bad)
    ckpt = training_checkpoint(sparse_tiny())
    ckpt["arch"]["weights"] = "/etc/passwd"
    atomic_save(ckpt, str(tmp_path / "c.pth"))
    with pytest.raises(ss.SemisparseError, match="which a file may not set"):
        load_training_checkpoint(tmp_path / "c.pth")
    assert opened == []


def test_a_huge_architecture_in_a_header_is_refused_before_anything_is_allocated(tmp_path, capsys):
    ckpt = training_checkpoint(sparse_tiny())
    ckpt["arch"]["width"] = 1_000_000  # the 72 TB
    atomic_save(ckpt, str(tmp_path / "c.pth"))
    err = one_line_error(["report", str(tmp_path / "c.pth")], capsys)
    assert "does not match the tensors in the file" in err and "0.weight" in err
    path = ck.save(sparse_tiny(), tmp_path / "m.safetensors")
    bad = resave(path, tmp_path / "bad.safetensors", edit_header=lambda h: h["arch"].update(num_classes=10**9),
                  digest_of=ck._file_digest)  # fmt: skip
    with pytest.raises(ss.SemisparseError, match="does not match the tensors in the file"):
        ss.load(bad)
    assert all(device == "meta" for device, classes, width in BUILT_ON if max(classes, width) > 10_000)


def test_a_layer_declared_far_larger_than_its_stored_entries_is_refused_before_decoding(tmp_path):
    model = sparse_tiny(0.9)
    path = ck.save(model, tmp_path / "m.safetensors")
    rows = 64

    def widen(h):  # 7.weight is Linear(128, 64) at fan-in: claim 2**22 inputs per row (1 GB of mask)
        h["layers"]["7.weight"].update(shape=[rows, 1 << 22], width=1 << 22)

    bad = resave(path, tmp_path / "bad.safetensors", edit_header=widen, digest_of=ck._file_digest)
    with pytest.raises(ss.SemisparseError, match="more than 4096 times the"):
        ss.load(bad, model=sparse_tiny(0.9))


# ------------------------------------------------------------------------------ 5. one-line load messages


def test_a_pickle_of_code_or_of_foreign_objects_given_to_weights_is_one_line_without_torchs_advice(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    torch.save({"model": {"w": torch.ones(1)}, "when": __import__("datetime").date(2024, 1, 1)}, tmp_path / "f.pth")
    for name, found in (("evil.pth", "posix.system"), ("f.pth", "datetime.date")):
        err = one_line_error(["train", "--data-path", "digits", "--weights", str(tmp_path / name), "--epochs", "1",
                              "--device", "cpu"], capsys)  # fmt: skip
        assert "never runs pickled code" in err and found in err, err
        assert "weights_only" not in err and "False" not in err, err


def test_weights_given_a_compressed_file_of_another_model_is_one_line(tmp_path, capsys):
    # `train --weights x.safetensors` loads a compressed file (masks kept); another model's is refused
    path = ck.save(sparse_tiny(), tmp_path / "model.safetensors")
    err = one_line_error(["train", "--data-path", "digits", "--weights", str(path), "--epochs", "1",
                          "--device", "cpu"], capsys)  # fmt: skip
    assert str(path) in err and "does not match" in err


def test_loading_a_folder_says_it_is_a_folder(tmp_path, capsys):
    with pytest.raises(ss.SemisparseError, match="is a folder; expected a file"):
        ss.load(tmp_path)
    assert "is a folder" in one_line_error(["report", str(tmp_path)], capsys)


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.update(arch=["tiny", 10]), "arch is a list; expected a mapping"),
    (lambda h: h["layers"].update({"3.weight": "2:4"}), "the entry is a str; expected a mapping"),
    (lambda h: h["layers"]["3.weight"].update(shape="3x3"), "is not a list of at least two positive ints"),
    (lambda h: h["layers"]["3.weight"].update(target=[2, 4]), "target is not a mapping"),
])  # fmt: skip
def test_a_header_of_the_wrong_shape_is_one_line_in_report(tmp_path, capsys, edit, match):
    path = ck.save(sparse_tiny(), tmp_path / "m.safetensors")
    bad = resave(path, tmp_path / "bad.safetensors", edit_header=edit, digest_of=ck._file_digest)
    assert match in one_line_error(["report", str(bad)], capsys)
    assert match in one_line_error(["report", str(bad), "--model", "tiny", "--num-classes", "10"], capsys)


@pytest.mark.parametrize("field, value, match", [
    ("epoch", "x", "'epoch' is 'x'; expected the last finished epoch as an int"),
    ("step", -3, "'step' is -3"),
    ("args", ["lr", 0.1], "'args' is list; expected a dict"),
])  # fmt: skip
def test_a_checkpoint_field_of_the_wrong_kind_is_one_line(tmp_path, capsys, field, value, match):
    ckpt = training_checkpoint(sparse_tiny())
    ckpt[field] = value
    atomic_save(ckpt, str(tmp_path / "c.pth"))
    with pytest.raises(ss.SemisparseError, match=match):
        load_checkpoint(str(tmp_path / "c.pth"))
    assert match in one_line_error(["report", str(tmp_path / "c.pth")], capsys)


# ------------------------------------------------------------- 6. temporary names carry the writer's pid


def test_atomic_writes_temporary_name_is_the_one_run_folders_clean_up(tmp_path):
    seen = []

    def write(tmp):
        seen.append(os.path.basename(tmp))
        open(tmp, "wb").close()

    io_files.atomic_write(tmp_path / "checkpoint.pth", write)
    m = io_files.TEMP_NAME.fullmatch(seen[0])
    assert m and m.group(1) == "checkpoint.pth" and int(m.group(2)) == os.getpid()
    # a partial file of this (live) process is kept; the same name from a dead process is removed
    (tmp_path / seen[0]).write_bytes(b"partial")
    dead = seen[0].replace(f".{os.getpid()}.", ".999999999.")
    (tmp_path / dead).write_bytes(b"partial")
    assert run_folder.remove_temp_files(str(tmp_path)) == [dead]
    assert (tmp_path / seen[0]).exists()


# ------------------------------------------------------ --resume: digest, masks against their pattern, fields

RESUME = ["train", "--device", "cpu", "--data-path", "digits", "-b", "128", "--lr", "0.05", "--print-freq", "0",
          "--sparsity", "sparse_2x4", "--apex-verbosity", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    """A finished one-epoch sparse_2x4 run on digits."""
    out = tmp_path_factory.mktemp("sparse") / "run"
    assert cli([*RESUME, "--epochs", "1", "--output-dir", str(out)]) == 0
    return out


def _resume_edited(sparse_run, tmp_path, edit, *, reseal=True):
    try:
        from semisparse.io.digest import seal
    except ImportError:  # before digests: the same file, which that version loads as it is
        seal = dict

    out = tmp_path / "run"
    out.mkdir()
    ckpt = torch.load(sparse_run / "checkpoint.pth", weights_only=True)
    edit(ckpt)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)  # to write deeply nested values at all
    try:
        torch.save(seal(ckpt) if reseal else ckpt, out / "checkpoint.pth")
    finally:
        sys.setrecursionlimit(limit)
    return out, (out / "checkpoint.pth").read_bytes()


def _dense_mask(ckpt):
    key = "features.5.parametrizations.weight.0.mask"
    ckpt["model"][key] = torch.ones_like(ckpt["model"][key])
    ckpt["sparsity"]["masks"]["features.5.weight"] = ckpt["model"][key].clone()


RESUME_CASES = {
    "mask breaks 2:4": (_dense_mask, True, "features.5.weight"),
    "changed shape": (lambda c: c["model"].update({"features.0.bias": torch.zeros(33)}), True,
                      "does not fit this run's model (shape mismatch: features.0.bias (33,) vs (32,))"),
    "epoch x": (lambda c: c.update(epoch="x"), True, "'epoch' is 'x'; expected the last finished epoch as an int"),
    "kept weight 1e30": (lambda c: c["model"]["features.5.parametrizations.weight.original"].view(-1)[0].fill_(1e30),
                         False, "is corrupted: its contents do not match the digest"),
    # resealed (the digest matches): what a resume would trip over mid-run, refused before training
    "steplr step_size 0": (lambda c: c["lr_scheduler"].update(step_size=0), True,
                           "'lr_scheduler.step_size' is 0; expected a positive number"),
    "scheduler gamma nan": (lambda c: c["lr_scheduler"].update(gamma=float("nan")), True,
                            "'lr_scheduler.gamma' is nan"),
    "rng torch short": (lambda c: c["rng"].update(torch=c["rng"]["torch"][:100]), True, "'rng.torch' is not"),
    "rng python": (lambda c: c["rng"]["python"].__setitem__(1, [7] * 3), True, "'rng.python' is not"),
    "rng numpy": (lambda c: c["rng"]["numpy"].update(pos=10**6), True, "'rng.numpy' is not"),
    "optimizer None": (lambda c: c.update(optimizer=None), True, "'optimizer' is not an optimizer state_dict"),
    "optimizer buffer shape": (lambda c: c["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3)), True,
                               "'optimizer.state[0].momentum_buffer' has shape (3,); its parameter has shape"),
    "optimizer buffer nan": (lambda c: c["optimizer"]["state"][1]["momentum_buffer"].view(-1)[0].fill_(float("nan")),
                             True, "'optimizer.state[1].momentum_buffer' holds NaN or inf"),
    "optimizer groups": (lambda c: c["optimizer"]["param_groups"][0]["params"].pop(), True,
                         "'optimizer.param_groups' holds groups of"),
    "optimizer lr inf": (lambda c: c["optimizer"]["param_groups"][0].update(lr=float("inf")), True,
                         "'optimizer.param_groups[0].lr' is inf"),
    "nested args": (lambda c: c["args"].update(deep=_nested(5000)), True, "nests values more than 64 levels deep"),
}  # fmt: skip


def _nested(depth):
    x = 1
    for _ in range(depth):
        x = [x]
    return x


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_refuses_a_bad_checkpoint_in_one_line_before_training(sparse_run, tmp_path, capsys, case):
    edit, reseal, match = RESUME_CASES[case]
    out, before = _resume_edited(sparse_run, tmp_path, edit, reseal=reseal)
    err = one_line_error([*RESUME, "--epochs", "2", "--output-dir", str(out), "--resume", str(out / "checkpoint.pth")],
                         capsys)  # fmt: skip
    assert match in err, err
    if case == "mask breaks 2:4":
        assert "2:4" in err
    assert (out / "checkpoint.pth").read_bytes() == before and sorted(os.listdir(out)) == ["checkpoint.pth"]


def test_report_of_a_compressed_file_without_arch_checks_its_digest(tmp_path, capsys):
    model = sparse_tiny()
    del model.semisparse_arch
    path = ck.save(model, tmp_path / "m.safetensors")
    bad = resave(path, tmp_path / "bad.safetensors", lambda t: t["3.weight::values"].view(-1)[0].fill_(1e30))
    assert "is corrupted" in one_line_error(["report", str(bad)], capsys)


def test_json_files_are_written_atomically_and_a_failed_write_keeps_the_old_one(tmp_path):
    """bench --json and the demo's report.json were written in place (a failure mid-way truncated a good file);
    every JSON file now goes through one atomic writer."""
    from semisparse.io.files import write_json

    path = tmp_path / "results.json"
    write_json(path, {"rows": [1, 2]}, indent=2)
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    with pytest.raises(TypeError):
        write_json(path, {"rows": [object()]})  # JSON cannot hold it
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left behind


def test_a_header_naming_a_model_that_cannot_be_built_on_meta_is_refused_without_building_it(tmp_path, capsys):
    import resource
    import time

    model = sparse_tiny()
    path = ss.save(model, tmp_path / "m.safetensors")
    out = resave(path, tmp_path / "regnet.safetensors",
                 edit_header=lambda h: h.update(arch={"name": "regnet_y_128gf", "num_classes": 10}),
                 digest_of=ck._file_digest)  # fmt: skip
    assert out.stat().st_size < 200_000
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ss.SemisparseError, match="regnet_y_128gf.*does not match the tensors in the file") as info:
        ss.load(out)
    assert len(str(info.value).splitlines()) == 1
    assert time.perf_counter() - t0 < 5  # built for real: 17 s
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 500_000  # kB; built for real: 3.3 GB
    assert "regnet_y_128gf" in one_line_error(["report", str(out)], capsys)


def test_a_regnet_file_still_loads_into_the_model_it_records(tmp_path):
    m = models.create_model("regnet_x_400mf", num_classes=10)
    ss.sparsify(m, "2:4")
    path = ss.save(m, tmp_path / "regnet.safetensors")
    loaded = ss.load(path)
    assert loaded.semisparse_arch == {"name": "regnet_x_400mf", "num_classes": 10}
    assert all(torch.equal(a, b) for a, b in zip(ss.masks(loaded).values(), ss.masks(m).values()))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded.eval()(x), m.eval()(x))


DST = ["train", "--device", "cpu", "--data-path", "digits", "-b", "256", "--lr", "0.05", "--print-freq", "0",
       "--dst", "rigl", "--apex-verbosity", "0"]  # fmt: skip


def test_resume_refuses_a_dst_state_missing_a_layer_in_one_line(tmp_path, capsys):
    from semisparse.io.digest import seal

    src = tmp_path / "src"
    assert cli([*DST, "--epochs", "1", "--output-dir", str(src)]) == 0
    ckpt = torch.load(src / "checkpoint.pth", weights_only=True)
    layer = sorted(ckpt["sparsity"]["state"]["dst"]["layers"])[0]
    del ckpt["sparsity"]["state"]["dst"]["layers"][layer]
    out = tmp_path / "run"
    out.mkdir()
    torch.save(seal(ckpt), out / "checkpoint.pth")
    err = one_line_error([*DST, "--epochs", "2", "--output-dir", str(out), "--resume", str(out / "checkpoint.pth")],
                         capsys)  # fmt: skip
    assert f"checkpoint {out / 'checkpoint.pth'}: 'sparsity.state'" in err and layer in err, err


def test_a_deeply_nested_compressed_header_is_one_line(tmp_path, capsys):
    path = ck.save(sparse_tiny(), tmp_path / "m.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        text = f.metadata()["semisparse"]
    for depth in (200, 100_000):  # parsed, then refused; too deep for the JSON parser itself
        bad = tmp_path / f"deep{depth}.safetensors"
        deep = text[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
        save_file(tensors, str(bad), metadata={"semisparse": deep})
        with pytest.raises(ss.SemisparseError, match="header") as info:
            ss.load(bad)
        assert len(str(info.value).splitlines()) == 1
        assert "header" in one_line_error(["report", str(bad)], capsys)


def test_report_checks_a_compressed_files_digest_before_reading_its_tensors(tmp_path, capsys):
    path = ck.save(sparse_tiny(), tmp_path / "m.safetensors")
    bad = resave(path, tmp_path / "bad.safetensors", edit_header=lambda h: h["dense"].append("ghost.weight"))
    assert "is corrupted" in one_line_error(["report", str(bad)], capsys)
