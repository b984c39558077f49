"""The model registry: names, CIFAR models, weights from local files only."""

import os

import pytest
import torch
import torchvision
from torch import nn

import semisparse as ss
from semisparse.models import create_model, list_models


def test_create_model_records_arch_for_rebuilding():
    m = create_model("digits_cnn", num_classes=7, width=8)
    assert m.semisparse_arch == {"name": "digits_cnn", "num_classes": 7, "width": 8}
    again = create_model(**{**m.semisparse_arch})
    assert [p.shape for p in again.parameters()] == [p.shape for p in m.parameters()]


def test_digits_cnn_shapes_and_no_norm_layers():
    m = create_model("digits_cnn", num_classes=10)
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


def test_resnet18_cifar_has_3x3_stem_and_no_maxpool():
    m = create_model("resnet18_cifar", num_classes=10)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # the layer names stay torchvision's, so every eligible conv is found by the planner
    rep = ss.sparsify(m, "2:4")
    assert sum(1 for r in rep.layers if r.sparse) == 20  # all convs but the RGB stem, plus fc


def test_wrn22_2_shape_and_size():
    m = create_model("wrn22_2", num_classes=10)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    n = sum(p.numel() for p in m.parameters())
    assert 1.0e6 < n < 1.2e6  # WRN-22-2 has about 1.1M parameters
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 3 * 2 + 3  # stem, 2 per block, 3 shortcuts


def test_torchvision_model_by_name_with_num_classes():
    m = create_model("resnet18", num_classes=5)
    assert m.fc.out_features == 5
    assert "resnet18" in list_models() and "wrn22_2" in list_models()


def test_unknown_model_is_a_clear_error_with_suggestion():
    with pytest.raises(ss.SemisparseError, match="unknown model 'resnet81'.*resnet18"):
        create_model("resnet81")


def test_timm_prefix_without_timm_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_timm(name, *a, **k):
        if name == "timm":
            raise ImportError("no timm")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ss.SemisparseError, match="pip install timm"):
        create_model("timm/resnet18")


def test_weights_from_local_file_and_checkpoint_dict(tmp_path):
    src = create_model("digits_cnn")
    torch.save(src.state_dict(), tmp_path / "sd.pth")
    torch.save({"model": src.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    for f in ("sd.pth", "ckpt.pth"):
        m = create_model("digits_cnn", weights=str(tmp_path / f))
        for a, b in zip(m.state_dict().values(), src.state_dict().values()):
            assert torch.equal(a, b)


def test_weights_from_sparse_checkpoint_load_effective_values(tmp_path):
    src = create_model("digits_cnn")
    ss.sparsify(src, "2:4")
    torch.save({"model": src.state_dict()}, tmp_path / "sparse.pth")
    m = create_model("digits_cnn", weights=str(tmp_path / "sparse.pth"))
    w = m.features[2].weight
    assert torch.equal(w, src.features[2].weight.detach())
    assert float((w == 0).float().mean()) == 0.5


def test_weights_of_other_model_or_garbage_are_clear_errors(tmp_path):
    torch.save(create_model("digits_cnn", num_classes=3).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ss.SemisparseError, match="do not fit this model.*shape mismatch"):
        create_model("digits_cnn", num_classes=10, weights=str(tmp_path / "other.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ss.SemisparseError, match="cannot read weights"):
        create_model("digits_cnn", weights=str(tmp_path / "junk.pth"))


def test_weights_enum_only_from_local_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = "SqueezeNet1_1_Weights.IMAGENET1K_V1"
    with pytest.raises(ss.SemisparseError, match="not in the local torch hub cache.*put it at"):
        create_model("squeezenet1_1", weights=name)
    url = torchvision.models.get_weight(name).url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    os.makedirs(os.path.dirname(path))
    ref = torchvision.models.squeezenet1_1(weights=None)
    torch.save(ref.state_dict(), path)
    m = create_model("squeezenet1_1", weights=name)
    assert torch.equal(m.features[0].weight, ref.features[0].weight)
    with pytest.raises(ss.SemisparseError, match="neither a file nor a torchvision weights name"):
        create_model("squeezenet1_1", weights="NoSuch_Weights.X")


def test_timm_prefix_builds_through_timm_create_model(monkeypatch):
    import sys
    import types

    calls = []

    def fake_create_model(name, pretrained, num_classes, **kw):
        calls.append((name, pretrained, num_classes, kw))
        return nn.Linear(4, num_classes)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=fake_create_model))
    m = create_model("timm/convnext_atto", num_classes=3)
    assert calls == [("convnext_atto", False, 3, {})]
    assert m.semisparse_arch == {"name": "timm/convnext_atto", "num_classes": 3}
