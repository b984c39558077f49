"""The training engine: accuracy on digits, accumulation, clipping, AMP, EMA, channels-last, checkpoints."""

import dataclasses
import os

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import semisparse as ss
from semisparse.models import create_model
from semisparse.train import (
    EMA,
    SparsityConfig,
    TrainingSparsity,
    build_lr_scheduler,
    build_optimizer,
    evaluate,
    fit,
    load_checkpoint,
    load_data,
    make_loaders,
)
from semisparse.train.checkpoint import atomic_save
from semisparse.train.optim import parameter_groups


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def small(digits):
    """256 training images: 8 steps of 32, enough to compare two runs."""
    return dataclasses.replace(digits, train=Subset(digits.train, range(256)))


def _run(digits, epochs=1, batch=32, opt="sgd", lr=0.05, seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model("digits_cnn", num_classes=10)
    sparsity = kw.pop("sparsity", None)
    if sparsity is not None:
        sparsity.apply(model, 100)
    tl, vl = make_loaders(digits, batch, seed=seed)
    optimizer = build_optimizer(model, opt, lr, 0.9, 1e-4)
    sched = build_lr_scheduler(optimizer, "cosineannealinglr", epochs=epochs)
    hist = fit(model, tl, vl, optimizer, sched, epochs, sparsity=sparsity, show_progress=False, seed=seed, **kw)
    return model, hist


def test_digits_cnn_reaches_95_percent_in_6_epochs(digits):
    _, hist = _run(digits, epochs=6, opt="adamw", lr=3e-3)
    assert hist[-1]["val_acc1"] >= 95.0


def test_magnitude_2_4_training_keeps_exact_2_4(digits):
    sp = TrainingSparsity(SparsityConfig(method="magnitude", pattern="2:4"))
    model, hist = _run(digits, epochs=1, sparsity=sp)
    ss.check(model)
    assert hist[-1]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert sp.step == 45


def test_history_records_have_the_documented_fields(digits):
    _, hist = _run(digits, ema=None)
    assert set(hist[0]) >= {"epoch", "lr", "train_loss", "val_loss", "val_acc1", "val_acc5", "sparsity",
                            "epoch_seconds"}
    assert hist[0]["epoch"] == 0 and hist[0]["sparsity"] == 0.0


def test_gradient_accumulation_equals_the_larger_batch(small):
    a, _ = _run(small, batch=32)
    b, _ = _run(small, batch=16, accumulation_steps=2)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=2e-4)


def test_clip_grad_norm_changes_the_update_only_when_binding(small):
    ref, _ = _run(small)
    loose, _ = _run(small, clip_grad_norm=1e9)
    tight, _ = _run(small, clip_grad_norm=1e-3)
    w = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert torch.equal(w(ref), w(loose))
    assert not torch.allclose(w(ref), w(tight))


def test_bf16_autocast_on_cpu_trains_and_differs_from_fp32(small):
    _, fp32 = _run(small)
    _, bf16 = _run(small, amp_dtype=torch.bfloat16)
    assert bf16[0]["train_loss"] == pytest.approx(fp32[0]["train_loss"], rel=0.05)
    assert bf16[0]["train_loss"] != fp32[0]["train_loss"]


def test_channels_last_gives_the_same_training(small):
    a, _ = _run(small)
    b, _ = _run(small, channels_last=True)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_ema_tracks_an_average_and_is_evaluated(digits):
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=10)
    ema = EMA(model, 0.9)
    start = [p.detach().clone() for p in ema.module.parameters()]
    tl, vl = make_loaders(digits, 32)
    opt = build_optimizer(model, "sgd", 0.05)
    hist = fit(model, tl, vl, opt, None, 1, ema=ema, ema_steps=2, show_progress=False)
    assert "ema_val_acc1" in hist[0]
    assert int(ema.n_averaged) == 45 // 2
    p0, pe, pm = start[0], next(ema.module.parameters()), next(model.parameters())
    assert not torch.equal(pe, p0) and not torch.equal(pe, pm)


def test_ema_follows_masks_and_keeps_them_bool(digits):
    model = create_model("digits_cnn", num_classes=10)
    ss.sparsify(model, "2:4")
    ema = EMA(model, 0.5)
    ema.update(model)
    ema.update(model)
    assert ss.masks(ema.module).keys() == ss.masks(model).keys()
    assert all(m.dtype == torch.bool for m in ss.masks(ema.module).values())


def test_checkpoint_is_weights_only_with_torchvision_layout(digits, tmp_path):
    sp = TrainingSparsity(SparsityConfig(method="magnitude", pattern="2:4"))
    model, _ = _run(digits, sparsity=sp, output_dir=str(tmp_path), args={"lr": 0.05, "model": "digits_cnn"})
    for name in ("checkpoint.pth", "model_0.pth"):
        ckpt = torch.load(tmp_path / name, weights_only=True)
        assert {"model", "optimizer", "lr_scheduler", "epoch", "args", "arch", "sparsity", "rng", "scaler",
                "ema"} <= set(ckpt)
    assert ckpt["epoch"] == 0 and ckpt["args"]["lr"] == 0.05
    assert ckpt["arch"] == {"name": "digits_cnn", "num_classes": 10}
    assert "features.2.parametrizations.weight.0.mask" in ckpt["model"]
    masks = ckpt["sparsity"]["masks"]
    assert ckpt["sparsity"]["pattern"] == "2:4" and set(masks) == set(ss.masks(model))
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_atomic_save_never_leaves_a_broken_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"epoch": 1}, str(path))
    before = path.read_bytes()

    def broken(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(ss.SemisparseError, match=f"cannot write {path}: disk full; nothing was replaced"):
        atomic_save({"epoch": 2}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_load_checkpoint_refuses_pickled_code_and_non_checkpoints(tmp_path):
    class Code:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"model": Code()}, tmp_path / "evil.pth")
    with pytest.raises(ss.SemisparseError, match="never runs pickled code"):
        load_checkpoint(str(tmp_path / "evil.pth"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ss.SemisparseError, match="not a training checkpoint"):
        load_checkpoint(str(tmp_path / "other.pth"))


def test_evaluate_top1_top5_against_manual_count():
    torch.manual_seed(0)
    x, y = torch.randn(50, 7), torch.randint(0, 7, (50,))
    model = nn.Linear(7, 7)
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    out = model(x)
    ev = evaluate(model, nn.CrossEntropyLoss(), loader)
    assert ev["acc1"] == pytest.approx(100 * float((out.argmax(1) == y).float().mean()))
    assert ev["acc5"] == pytest.approx(100 * float((out.topk(5, 1).indices == y[:, None]).any(1).float().mean()))
    assert ev["loss"] == pytest.approx(float(nn.functional.cross_entropy(out, y).detach()), rel=1e-5)


def test_parameter_groups_split_norm_bias_embedding_and_mask_logits():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.class_token = nn.Parameter(torch.zeros(1, 4))
            self.lin = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

    groups = parameter_groups(Tiny(), 0.1, norm_weight_decay=0.0, bias_weight_decay=0.2, embedding_decay=0.3)
    by_wd = {g["weight_decay"]: len(g["params"]) for g in groups}
    assert by_wd == {0.3: 1, 0.1: 1, 0.2: 1, 0.0: 2}
