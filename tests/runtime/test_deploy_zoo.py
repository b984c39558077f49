"""ss.deploy over torchvision and timm architectures with random weights: the deployed model computes the masked
model's outputs, or leaves a layer as it is with the reason in the report; never a crash, never a silent
difference. Small configurations of the real classes at small inputs keep the default suite fast; the full-size
models the acceptance names run under ``slow``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse.masking.parametrization import sparse_weights
from semisparse.runtime import deploy

tv = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


def _tiny_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=10)


def _tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every output would be 0
    return model


def _tiny_resnetv2():
    from functools import partial

    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=[1, 1, 1, 1], channels=(32, 64, 128, 256), stem_chs=16, num_classes=10,
                    norm_layer=partial(GroupNormAct, num_groups=4))


# name: (factory, input size, what must be left as it is: (module class, reason fragment) or None)
ZOO = {
    "tv_swin_tiny_config": (_tiny_swin, 32, None),
    "tv_vit_tiny_config": (_tiny_vit, 32, None),
    "tv_mobilenet_v3_small": (lambda: tv.models.mobilenet_v3_small(num_classes=10), 32, None),
    "tv_shufflenet_v2_x0_5": (lambda: tv.models.shufflenet_v2_x0_5(num_classes=10), 32, None),
    "tv_squeezenet1_1": (lambda: tv.models.squeezenet1_1(num_classes=10), 48, None),
    "timm_resnetv2_stdconv": (_tiny_resnetv2, 32, ("StdConv2d", "redefines forward")),
    "timm_test_nfnet": (lambda: timm.create_model("test_nfnet"), 32, ("ScaledStdConv2d", "redefines forward")),
    "timm_test_efficientnet_same": (lambda: timm.create_model("test_efficientnet", pad_type="same"), 33,
                                    ("Conv2dSame", "redefines forward")),
    "timm_test_resnet": (lambda: timm.create_model("test_resnet"), 32, None),
    "timm_test_convnext": (lambda: timm.create_model("test_convnext"), 32, None),
    "timm_test_vit": (lambda: timm.create_model("test_vit", img_size=32), 32, None),
    "timm_test_byobnet": (lambda: timm.create_model("test_byobnet"), 32, None),
}


def _deploy_and_compare(factory, size, left, sparsity, plan):
    torch.manual_seed(0)
    model = factory().eval()
    ss.sparsify(model, sparsity)
    keys = {sw.key for sw in sparse_weights(model)}
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dep = deploy(model, plan=plan, example_input=x, reps=1)
    said = [str(w.message) for w in caught if "semisparse" in str(w.message)]
    for note in dep.semisparse_plan["undone"]:  # an undone rewrite is never silent
        assert any(note in s for s in said)
    x2 = torch.randn(2, 3, size, size)
    with torch.no_grad():
        got, want = dep(x2), model(x2)
    assert want.abs().max() > 0
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= 1e-4, f"deployed differs from the masked model by {err:.2e}"
    rows = {r.name: r for r in ss.report(dep).layers}
    assert keys <= set(rows)  # every masked layer is in the report: deployed, or left as is with the reason
    for key in keys:
        r = rows[key]
        assert r.pattern != "dense" and (r.extra.get("kernel", "").startswith(("condensed", "dense"))
                                         or r.reason.startswith("left as is: ")), (key, r)
    if left is not None:
        cls, why = left
        reasons = [rows[k].reason for k in keys if rows[k].reason]
        assert reasons and all(why in r for r in reasons if cls in r), reasons
        assert any(type(m).__name__ == cls for m in dep.modules())
    return dep


# 2-10 s of CPU each (2 busy cores): slow, to keep the default suite fast
HEAVIER = {"tv_mobilenet_v3_small", "tv_shufflenet_v2_x0_5", "tv_squeezenet1_1", "timm_test_byobnet"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVIER else n for n in ZOO])
def test_zoo_condensed_plan_equals_the_masked_model_or_says_why(name):
    factory, size, left = ZOO[name]
    _deploy_and_compare(factory, size, left, 0.9 if list(ZOO).index(name) % 2 else "2:4", "condensed")


@pytest.mark.parametrize("name", ["tv_swin_tiny_config", "timm_resnetv2_stdconv",
                                  pytest.param("timm_test_nfnet", marks=pytest.mark.slow)])
def test_zoo_measured_plan_equals_the_masked_model(name):
    factory, size, left = ZOO[name]
    _deploy_and_compare(factory, size, left, 0.9, "measure")


@pytest.mark.slow
@pytest.mark.parametrize("name,size,left", [
    ("swin_t", 32, None),
    ("resnetv2_50x1_bit", 32, ("StdConv2d", "redefines forward")),
    ("nf_resnet26", 32, ("ScaledStdConv2d", "redefines forward")),
])
def test_zoo_full_size_models_named_in_the_acceptance(name, size, left):
    factory = (lambda: tv.models.swin_t()) if name == "swin_t" else (lambda: timm.create_model(name))
    _deploy_and_compare(factory, size, left, "2:4", "condensed")


def test_zoo_models_hold_the_layer_kinds_they_are_here_for():
    """The zoo tests mean something only while these configurations still build the classes in question."""
    kinds = {name: {type(m).__name__ for m in ZOO[name][0]().modules()} for name in
             ("timm_resnetv2_stdconv", "timm_test_nfnet", "timm_test_efficientnet_same", "tv_swin_tiny_config")}
    assert "StdConv2d" in kinds["timm_resnetv2_stdconv"] and "ScaledStdConv2d" in kinds["timm_test_nfnet"]
    assert "Conv2dSame" in kinds["timm_test_efficientnet_same"]
    assert "ShiftedWindowAttention" in kinds["tv_swin_tiny_config"] and isinstance(nn.Linear, type)
