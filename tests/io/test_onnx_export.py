"""ONNX export: a plain graph whose outputs equal the masked model's and whose weights are exactly 2:4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import semisparse as ss

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) is not installed")
pytest.importorskip("onnxscript", reason="onnxscript (onnx extra) is not installed")

from onnx import numpy_helper  # noqa: E402

from semisparse.io.onnx_export import export_onnx  # noqa: E402


def initializers(path) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]


def find_exported(weights: list[np.ndarray], w: np.ndarray) -> np.ndarray | None:
    """The initializer holding ``w`` as exported: itself, or its transpose (MatMul takes ``W.T``)."""
    for a in weights:
        if a.shape == w.shape and np.array_equal(a, w):
            return a
        if w.ndim == 2 and a.shape == w.T.shape and np.array_equal(a, w.T):
            return a.T
    return None


def assert_export_is_plain_24(model: nn.Module, x: torch.Tensor, path) -> None:
    with torch.no_grad():
        ref = model(x).numpy()
    export_onnx(model, path, x)
    sess = ort.InferenceSession(str(path))
    x2 = torch.randn(x.shape[0] + 1, *x.shape[1:])  # another batch: the batch dimension is dynamic
    with torch.no_grad():
        ref2 = model(x2).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sess.run(None, {"input": x2.numpy()})[0], ref2, rtol=1e-4, atol=1e-5)
    weights = initializers(path)
    masks = ss.masks(model)
    for key, mask in masks.items():
        mod_name, _, param = key.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        dense = getattr(mod, param).detach().numpy()  # original * mask
        got = find_exported(weights, dense)
        assert got is not None, f"{key}: masked weight not found among the ONNX initializers"
        view = got.reshape(got.shape[0], got.shape[1], -1).transpose(0, 2, 1).reshape(got.shape[0], -1)
        groups = (view != 0).reshape(view.shape[0], -1, 4).sum(-1)
        assert groups.max() <= 2, f"{key}: exported weight is not 2:4"
        assert np.array_equal(view != 0, _view(mask.numpy())), f"{key}: zeros not where the mask says"
    for a in weights:  # no mask tensors exported
        assert not (a.dtype == np.bool_ and a.size > 1)


def _view(mask: np.ndarray) -> np.ndarray:
    return mask.reshape(mask.shape[0], mask.shape[1], -1).transpose(0, 2, 1).reshape(mask.shape[0], -1)


def test_cnn_exports_plain_24_weights_equal_outputs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 12)).eval()
    ss.sparsify(model, "2:4")
    with torch.no_grad():  # kept weights that are exactly 0 would blur the zeros-vs-mask check
        for p in model.parameters():
            p.add_(torch.sign(p) * 1e-3)
    x = torch.randn(2, 3, 12, 12)
    assert_export_is_plain_24(model, x, tmp_path / "cnn.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "cnn.onnx")).graph.node}
    assert "Mul" not in ops  # no mask multiply


@pytest.mark.slow
def test_vit_with_packed_qkv_exports(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.05)
    ss.sparsify(model, "2:4")
    assert_export_is_plain_24(model, torch.randn(2, 3, 32, 32), tmp_path / "vit.onnx")


def test_cli_export_onnx_from_a_compressed_file(tmp_path, capsys):
    from semisparse.cli import main as cli
    from semisparse.models import create_model

    torch.manual_seed(0)
    model = create_model("digits_cnn").eval()
    ss.sparsify(model, "2:4")
    ss.save(model, tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    assert cli(["export", str(tmp_path / "m.safetensors"), "--onnx", "-o", str(out), "--input-size", "1x8x8"]) == 0
    assert "zeros in place" in capsys.readouterr().out
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = ss.load(tmp_path / "m.safetensors").eval()(x).numpy()
    got = ort.InferenceSession(str(out)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
