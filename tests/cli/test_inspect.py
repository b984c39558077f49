"""`semisparse export` / `semisparse report` on training checkpoints built by hand in the engine's layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import semisparse as ss
from helpers.threads import one_thread  # noqa: F401 - autouse: one torch thread here
from semisparse import models
from semisparse.cli import main as cli
from semisparse.io import compressed as ck
from semisparse.masking import parametrization_of
from semisparse.patterns import NM


def tiny(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """A stand-in model registry: `tiny` only (the real one is exercised by the end-to-end test)."""

    def build(num_classes=1000):
        torch.manual_seed(99)  # different values from the trained model: loading must fill them
        return tiny(num_classes)

    monkeypatch.setitem(models.MODELS, "tiny", build)


def trained(pattern, **kw) -> nn.Module:
    model = tiny()
    model.semisparse_arch = {"name": "tiny", "num_classes": 10}
    ss.sparsify(model, pattern, **kw)
    with torch.no_grad():  # pretend training moved BN statistics
        model[1].running_mean.uniform_(-1, 1)
    return model


def write_training_checkpoint(
    path, model, pattern="2:4", *, masks_in_sparsity=True, extra_state=None, prefix=""
):
    state = {prefix + k: v for k, v in model.state_dict().items()}
    state.update(extra_state or {})
    sparsity = {"pattern": pattern, "method": "magnitude", "epoch": 3}
    if masks_in_sparsity:
        sparsity["masks"] = ss.masks(model)
    torch.save(
        {
            "model": state,
            "arch": {"name": "tiny", "num_classes": 10},
            "args": {"lr": 0.1, "epochs": 3},
            "epoch": 3,
            "sparsity": sparsity,
        },
        path,
    )
    return path


def run(argv, capsys):
    code = cli(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_equal_models(a: nn.Module, b: nn.Module) -> None:
    ma, mb = ss.masks(a), ss.masks(b)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    ss.check(b)
    a.eval(), b.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_export_2to4_checkpoint_then_load_by_name(tmp_path, capsys):
    model = trained("2:4")
    src = write_training_checkpoint(tmp_path / "ckpt.pth", model)
    code, out, _ = run(["export", str(src)], capsys)
    assert code == 0 and "wrote" in out
    dst = tmp_path / "ckpt.safetensors"
    loaded = ss.load(dst)
    assert_equal_models(model, loaded)
    assert parametrization_of(loaded, "3.weight").target == NM(2, 4)
    assert ck.read_header(dst)["layers"]["3.weight"]["encoding"] == "nm"


def test_export_fanin_checkpoint_keeps_constant_fanin_structure(tmp_path, capsys):
    model = trained(0.9)
    masks = ss.masks(model)
    masks["7.weight"][[1, 2]] = False  # ablated neurons, as SRigL leaves them
    fresh = trained(0.9)
    ss.sparsify(fresh, 0.9, masks=masks, overwrite=True)
    src = write_training_checkpoint(tmp_path / "srigl.pth", fresh, pattern="srigl")  # not a pattern string
    code, _, _ = run(["export", str(src), "-o", str(tmp_path / "out" / "s.safetensors")], capsys)
    assert code == 0
    loaded = ss.load(tmp_path / "out" / "s.safetensors")
    assert_equal_models(fresh, loaded)
    header = ck.read_header(tmp_path / "out" / "s.safetensors")
    assert {e["encoding"] for e in header["layers"].values()} == {"fanin"}
    assert header["layers"]["7.weight"]["alive"] == 62


def test_export_unstructured_masks_fall_back_to_unstructured(tmp_path, capsys):
    model = trained("2:4")
    gen = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(v.shape, generator=gen) < 0.2 for k, v in ss.masks(model).items()}
    ss.sparsify(model, None, masks=masks, overwrite=True)
    src = write_training_checkpoint(tmp_path / "rigl.pth", model, pattern="0.8")
    assert run(["export", str(src)], capsys)[0] == 0
    loaded = ss.load(tmp_path / "rigl.safetensors")
    assert_equal_models(model, loaded)
    assert all(parametrization_of(loaded, k).target is None for k in masks)


def test_export_reads_masks_from_state_and_ignores_learned_mask_buffers(tmp_path, capsys):
    model = trained("2:4")
    extra = {"module.3.parametrizations.weight.0.logits": torch.randn(32, 36, 6)}
    src = write_training_checkpoint(
        tmp_path / "ddp.pth", model, masks_in_sparsity=False, extra_state=extra, prefix="module."
    )
    assert run(["export", str(src), "--fp16", "--keep-dense"], capsys)[0] == 0
    dst = tmp_path / "ddp.safetensors"
    header = ck.read_header(dst)
    assert header["dtype"] == "float16" and all(e["keep_dense"] for e in header["layers"].values())
    loaded = ss.load(dst)
    assert ss.masks(loaded).keys() == ss.masks(model).keys()
    dense = loaded[3].parametrizations.weight.original
    assert torch.equal(dense, model[3].parametrizations.weight.original.detach().half().float())


def test_report_of_training_checkpoint_and_of_compressed_file(tmp_path, capsys):
    model = trained("2:4")
    src = write_training_checkpoint(tmp_path / "c.pth", model)
    code, out, _ = run(["report", str(src), "--input-size", "1x8x8"], capsys)
    assert code == 0
    assert "3.weight" in out and "2:4" in out and "of MACs sparse" in out and "pattern=2:4" in out

    code, out, _ = run(["report", str(src), "--json"], capsys)
    doc = json.loads(out)
    assert doc["kind"] == "training checkpoint"
    assert {r["name"]: r["pattern"] for r in doc["report"]["layers"]}["3.weight"] == "2:4"

    run(["export", str(src)], capsys)
    dst = tmp_path / "c.safetensors"
    code, out, _ = run(["report", str(dst)], capsys)
    assert code == 0 and "dense in the same dtype" in out and "2:4" in out
    code, out, _ = run(["report", str(dst), "--json"], capsys)
    doc = json.loads(out)
    assert doc["kind"] == "compressed" and doc["file_bytes"] == os.path.getsize(dst)
    assert doc["file_bytes"] < doc["dense_bytes"] and doc["encodings"] == ["nm"]


def test_report_of_file_without_arch_lists_recorded_layers(tmp_path, capsys):
    model = tiny()
    ss.sparsify(model, 0.75)
    path = ss.save(model, tmp_path / "x.safetensors")
    code, out, _ = run(["report", str(path)], capsys)
    assert code == 0 and "7.weight" in out and "fan-in 32" in out and "model not rebuilt" in out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["report", "{missing}"], "no such file"),
        (["report", "{junk}"], "not a valid safetensors"),
        (["export", "{junk}"], "already a compressed file"),
        (["export", "{notckpt}"], "cannot read checkpoint"),
        (["export", "{ckpt}", "--fp16", "--bf16"], "one of --fp16 and --bf16"),
        (["export", "{ckpt}", "-o", "{ckpt}"], "would overwrite"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, argv, match):
    paths = {
        "missing": tmp_path / "nope.pth",
        "junk": tmp_path / "junk.safetensors",
        "notckpt": tmp_path / "n.pth",
        "ckpt": tmp_path / "c.pth",
    }
    paths["junk"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    paths["notckpt"].write_bytes(b"PK not really a zip")
    write_training_checkpoint(paths["ckpt"], trained("2:4"))
    code, out, err = run([a.format(**paths) for a in argv], capsys)
    assert code == 2, err
    assert match in err and len(err.strip().splitlines()) == 1


def test_checkpoint_for_another_architecture_is_a_clear_error(tmp_path, capsys):
    other = nn.Sequential(nn.Linear(4, 4))
    torch.save({"model": other.state_dict(), "arch": {"name": "tiny", "num_classes": 10}}, tmp_path / "o.pth")
    code, _, err = run(["export", str(tmp_path / "o.pth")], capsys)
    assert code == 2 and "does not match the tensors in the file" in err


@pytest.mark.slow
def test_end_to_end_with_the_real_registry(tmp_path, monkeypatch):
    monkeypatch.undo()
    models = pytest.importorskip("semisparse.models")
    model = models.create_model("digits_cnn", num_classes=10)
    ss.sparsify(model, 0.9)
    torch.save(
        {
            "model": model.state_dict(),
            "arch": model.semisparse_arch,
            "args": {},
            "sparsity": {"masks": ss.masks(model), "pattern": "0.9"},
        },
        tmp_path / "d.pth",
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "semisparse"]
    subprocess.run([*cmd, "export", str(tmp_path / "d.pth")], check=True, env=env, capture_output=True)
    out = subprocess.run(
        [*cmd, "report", str(tmp_path / "d.safetensors"), "--json", "--input-size", "1x8x8"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    doc = json.loads(out)
    assert doc["arch"]["name"] == "digits_cnn" and doc["ratio"] < 0.5
    assert doc["report"]["mac_share"] > 0.9
    loaded = ss.load(tmp_path / "d.safetensors")
    ss.check(loaded)
    assert all(torch.equal(a, b) for a, b in zip(ss.masks(model).values(), ss.masks(loaded).values()))
