"""ss.deploy folds eval BatchNorm into the conv before it: same outputs, BN gone, user model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy, deployed_layers
from semisparse.runtime.cpu import kernels
from semisparse.runtime.fold import fold_batchnorm

BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running stats and affine parameters, so a wrong fold shows."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, BN):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.3, 3)
                if mod.affine:
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.5, 0.5)
    return model


def bn_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, BN)}


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                    nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = Bottleneck(16)
        self.head = nn.Conv2d(16, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.head(self.block(self.stem(x)))).mean((2, 3))


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_folded_model_equals_masked_dense_and_user_model_untouched(sparsity):
    torch.manual_seed(0)
    model = randomize_bn(Net())
    ss.sparsify(model, sparsity)
    model.eval()
    x = torch.randn(3, 3, 11, 9)
    with torch.no_grad():
        ref = model(x)
    names = bn_names(model)
    dep = deploy(model, plan="condensed")
    assert dep.semisparse_plan["folded_bn"] == len(names) == 4
    assert all(isinstance(dep.get_submodule(n), nn.Identity) for n in names)
    assert not bn_names(dep)
    assert all(dep.get_submodule(n).bias is not None for n in ("stem.0", "block.branch.0", "head"))
    assert all(layer.mode == "condensed" for _, layer in deployed_layers(dep)) or not kernels.available()
    with torch.no_grad():
        assert rel_err(dep(x), ref) <= 1e-5
        assert rel_err(dep(x[:1]), model(x[:1])) <= 1e-5
        assert torch.equal(model(x), ref)  # the user's model still computes the same
    assert bn_names(model) == names and all(not model.get_submodule(n).training for n in names)
    assert model.block.branch[0].bias is None


@pytest.mark.parametrize("nd", [1, 3])
def test_conv1d_and_conv3d_fold(nd):
    torch.manual_seed(1)
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if nd == 1 else (nn.Conv3d, nn.BatchNorm3d)
    model = randomize_bn(nn.Sequential(conv(4, 8, 3, padding=1), bn(8), nn.ReLU(), conv(8, 4, 1), bn(4)))
    ss.sparsify(model, 0.5)
    x = torch.randn(2, 4, *([6] * nd))
    dep = deploy(model.eval(), plan="condensed")
    assert dep.semisparse_plan["folded_bn"] == 2 and not bn_names(dep)
    with torch.no_grad():
        assert rel_err(dep(x), model(x)) <= 1e-5


def test_dense_conv_without_mask_is_folded():
    torch.manual_seed(2)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                                       nn.BatchNorm2d(4)))
    ss.sparsify(model, None, masks={"3.weight": torch.rand(4, 8, 3, 3) < 0.5})  # conv 0 stays dense
    x = torch.randn(2, 3, 9, 9)
    dep = deploy(model.eval(), plan="condensed")
    assert type(dep[0]) is nn.Conv2d and isinstance(dep[1], nn.Identity) and isinstance(dep[4], nn.Identity)
    with torch.no_grad():
        assert rel_err(dep(x), model(x)) <= 1e-5


class SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(4, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(4, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        shared = self.bn2(self.conv2(x)) + self.bn2(self.conv3(x))  # one BN after two convs
        return self.bn(y) + y + shared


def test_bn_of_a_shared_conv_output_or_called_twice_is_not_folded():
    torch.manual_seed(3)
    model = randomize_bn(SharedOutput())
    ss.sparsify(model, 0.5)
    x = torch.randn(2, 4, 7, 7)
    dep = deploy(model.eval(), plan="condensed")
    assert dep.semisparse_plan["folded_bn"] == 0 and bn_names(dep) == {"bn", "bn2"}
    with torch.no_grad():
        assert rel_err(dep(x), model(x)) <= 1e-5


def test_training_mode_bn_is_not_folded():
    """deploy always works on an eval copy; fold_batchnorm itself must refuse a training BN (batch stats)."""
    torch.manual_seed(4)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    assert fold_batchnorm(model.train(), {}) == [] and isinstance(model[1], nn.BatchNorm2d)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        ref = model.eval()(x)
        assert fold_batchnorm(model, {}) == ["1"]
        assert isinstance(model[1], nn.Identity) and rel_err(model(x), ref) <= 1e-5


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_model_deploys_without_folding():
    torch.manual_seed(5)
    model = randomize_bn(Untraceable())
    ss.sparsify(model, 0.5)
    dep = deploy(model.eval(), plan="condensed")
    assert dep.semisparse_plan["folded_bn"] == 0 and isinstance(dep.bn, nn.BatchNorm2d)
    with torch.no_grad():
        for x in (torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6) + 1, torch.randn(2, 3, 6, 6) - 1):
            assert rel_err(dep(x), model(x)) <= 1e-5


def test_fold_bn_false_keeps_every_bn():
    torch.manual_seed(6)
    model = randomize_bn(Net())
    ss.sparsify(model, 0.5)
    dep = deploy(model.eval(), plan="condensed", fold_bn=False)
    assert dep.semisparse_plan["folded_bn"] == 0 and bn_names(dep) == bn_names(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(dep(x), model(x)) <= 1e-5


def test_resnet18_all_bn_folded():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(7)
    model = randomize_bn(torchvision.models.resnet18(weights=None))
    ss.sparsify(model, "2:4")
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    dep = deploy(model, plan="condensed")
    assert dep.semisparse_plan["folded_bn"] == len(bn_names(model)) == 20 and not bn_names(dep)
    with torch.no_grad():
        assert rel_err(dep(x), model(x)) <= 1e-4
