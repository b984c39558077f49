"""ss.deploy computes what the masked model computes on any model, or leaves the layer as it is and says why:
subclasses that change forward, code reading a layer's weight, hooks, shared and tied modules, branches."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy, deployed_layers
from semisparse.runtime.cpu import kernels
from semisparse.runtime.cpu.layers import SparseConv, SparseLinear
from semisparse.runtime.plain import why_not_plain


def assert_same(dep: nn.Module, model: nn.Module, *args, rtol: float = 1e-5, **kwargs) -> None:
    with torch.no_grad():
        got, want = dep(*args, **kwargs), model.eval()(*args, **kwargs)
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    assert err <= rtol, f"max relative error {err:.2e} > {rtol}"


def rows(dep: nn.Module) -> dict:
    return {r.name: r for r in ss.report(dep).layers}


class StdConv2d(nn.Conv2d):
    """Weight-standardising conv (as timm's ResNetV2 / BiT)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """TF 'SAME' padding computed from the input's size (as timm's Conv2dSame)."""

    def _conv_forward(self, x, weight, bias):
        ih, iw = x.shape[-2:]
        kh, kw = weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)


class CosineLinear(nn.Linear):
    def forward(self, x):
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1)) * 10


def _cnn(conv_cls, stride=1):
    torch.manual_seed(0)
    return nn.Sequential(conv_cls(3, 16, 3, stride=stride), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


@pytest.mark.parametrize("conv_cls,why", [(StdConv2d, "redefines forward"), (Conv2dSame, "redefines _conv_forward")])
def test_conv_subclass_that_changes_its_forward_is_left_as_it_is_with_the_reason(conv_cls, why):
    model = _cnn(conv_cls, stride=2)
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="condensed", example_input=torch.randn(1, 3, 9, 9))
    assert type(dep[0]) is conv_cls and isinstance(dep[2], SparseConv)  # the plain conv is still condensed
    for size in (9, 12):  # Conv2dSame pads by the input's size: another size pads otherwise
        assert_same(dep, model, torch.randn(2, 3, size, size))
    row = rows(dep)["0.weight"]
    assert row.reason.startswith("left as is") and why in row.reason and row.pattern != "dense"
    assert dep.semisparse_plan["left_as_is"] == {"0.weight": row.reason.removeprefix("left as is: ")}


def test_cosine_linear_is_left_as_it_is():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), CosineLinear(16, 6))
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="condensed", example_input=torch.randn(3, 12))
    assert type(dep[2]) is CosineLinear and isinstance(dep[0], SparseLinear)
    assert_same(dep, model, torch.randn(4, 12))
    assert "CosineLinear redefines forward" in rows(dep)["2.weight"].reason


class WeightReader(nn.Module):
    """Uses layers' weights outside their forward (swin's attention does F.linear(x, self.qkv.weight))."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 12)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        x = x.to(self.fc.weight.dtype).to(self.fc.weight.device)
        h = F.relu(F.linear(x, self.fc.weight, self.fc.bias)) + self.fc(x)
        img = F.conv2d(h[:, :8].reshape(-1, 2, 2, 2), self.conv.weight, self.conv.bias, padding=1)
        return self.out(h) + img.sum() * 1e-2 + self.out.weight.shape[1] + self.out.weight.T.sum()


def test_code_reading_a_deployed_layers_weight_computes_the_masked_weight():
    torch.manual_seed(0)
    model = WeightReader()
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="condensed", example_input=torch.randn(2, 10))
    assert isinstance(dep.fc, SparseLinear) and isinstance(dep.conv, SparseConv) and isinstance(dep.out, SparseLinear)
    assert_same(dep, model, torch.randn(5, 10))
    masked = model.fc.weight.detach()
    assert torch.equal(dep.fc.weight, masked) and dep.fc.weight.dtype == torch.float32
    assert dep.conv.weight.shape == model.conv.weight.shape and dep.conv.padding_mode == "zeros"


def test_deployed_weight_follows_load_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="condensed", example_input=torch.randn(1, 8))
    before = dep[0].weight.clone()
    state = {k: v * 2 if k.endswith("values") else v for k, v in dep.state_dict().items()}
    dep.load_state_dict(state)
    assert torch.equal(dep[0].weight, before * 2)


def test_forward_hooks_and_pre_hooks_of_a_replaced_layer_still_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ss.sparsify(model, 0.5)
    model[0].register_forward_pre_hook(lambda mod, args: (args[0] * 3,))
    model[2].register_forward_hook(lambda mod, args, out: out * -2 + 1)
    seen = []
    model[2].register_forward_hook(lambda mod, args, kwargs, out: seen.append(out.shape), with_kwargs=True)
    for plan in ("condensed", "measure"):
        dep = deploy(model, plan=plan, example_input=torch.randn(2, 8), reps=1)
        if plan == "condensed":
            assert isinstance(dep[0], SparseLinear) and isinstance(dep[2], SparseLinear)
        seen.clear()
        assert_same(dep, model, torch.randn(3, 8))
        assert seen == [torch.Size([3, 4]), torch.Size([3, 4])]  # once per call: the masked model's, the deployed's


class SharedBN(nn.Module):
    """One BatchNorm after two convs, reached under two names."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.bn_again = self.bn

    def forward(self, x):
        return self.bn(self.c1(x)) + self.bn_again(self.c2(x))


def _random_bn(model):
    torch.manual_seed(3)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.normal_()
            mod.bias.data.normal_()
    return model.eval()


def test_batchnorm_reached_from_two_places_is_not_folded():
    torch.manual_seed(0)
    model = _random_bn(SharedBN())
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="condensed", example_input=torch.randn(1, 3, 6, 6))
    assert isinstance(dep.bn, nn.BatchNorm2d) and dep.bn is dep.bn_again and dep.semisparse_plan["folded_bn"] == 0
    assert_same(dep, model, torch.randn(2, 3, 7, 7))


class Tied(nn.Module):
    """An encoder conv (reflect padding) whose weight the decoder reuses, transposed."""

    def __init__(self, use_attribute: bool):
        super().__init__()
        self.enc = nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")
        self.dec = nn.ConvTranspose2d(8, 4, 3, padding=1)
        self.dec.weight = self.enc.weight
        self.use_attribute = use_attribute

    def forward(self, x):
        h = F.relu(self.enc(x))
        if self.use_attribute:
            return F.conv_transpose2d(h, self.enc.weight, None, padding=1)
        return self.dec(h)


@pytest.mark.parametrize("use_attribute", [False, True])
def test_tied_weight_of_a_reflect_padded_conv_is_not_masked_for_its_other_user(use_attribute):
    torch.manual_seed(0)
    model = Tied(use_attribute)
    ss.sparsify(model, 0.5, include=["enc"])
    dep = deploy(model, plan="condensed", example_input=torch.randn(1, 4, 6, 6))
    assert_same(dep, model, torch.randn(2, 4, 5, 7))
    assert "padding_mode='reflect'" in rows(dep)["enc.weight"].reason
    dense = model.enc.parametrizations.weight.original
    assert torch.equal(model.dec.weight, dense)  # the user's model untouched


class ListReached(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.both = [self.fc1, self.fc2]  # a plain list: not registered, still called

    def forward(self, x):
        for layer in self.both:
            x = F.relu(layer(x))
        return x + self.fc2(torch.ones(1, 8))


def test_layers_reached_through_a_plain_list_compute_the_masked_layer():
    torch.manual_seed(0)
    model = ListReached()
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="condensed", example_input=torch.randn(2, 6))
    assert isinstance(dep.fc2, SparseLinear)
    assert_same(dep, model, torch.randn(3, 6))


class Branchy(nn.Module):
    """A forward whose BatchNorm runs only when asked: fx traces the asked-for branch (a Proxy is not None) and
    a fold of it would change the default call."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x, normalise=None):
        y = self.conv(x)
        if normalise is not None:
            y = self.bn(y)
        return y


def test_forward_branching_on_an_optional_argument_computes_both_branches():
    torch.manual_seed(0)
    model = _random_bn(Branchy())
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="condensed", example_input=torch.randn(1, 3, 5, 5))
    x = torch.randn(2, 3, 5, 5)
    assert_same(dep, model, x)
    assert_same(dep, model, x, normalise=True)


def _ablated_mlp(width=8, hidden=8):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
    first = torch.rand(hidden, width) < 0.6
    first[:, 0] = True
    first[:3] = False  # three hidden neurons ablated
    second = torch.rand(width, hidden) < 0.6
    second[:, 0] = True
    with torch.no_grad():
        mlp[0].bias.uniform_(0.5, 1.0)  # ablated neurons output relu(bias) != 0
    return mlp, {"0.weight": first, "2.weight": second}


class ReadsHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp, masks = _ablated_mlp()
        self.masks = {f"mlp.{k}": v for k, v in masks.items()}

    def forward(self, x):
        return self.mlp(x) + self.mlp[0](x).sum(-1, keepdim=True)  # every hidden neuron, ablated ones too


class IteratesWithResiduals(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp, masks = _ablated_mlp()
        self.masks = {f"mlp.{k}": v for k, v in masks.items()}

    def forward(self, x):
        for layer in self.mlp:
            x = x + layer(x)
        return x


@pytest.mark.parametrize("cls", [ReadsHidden, IteratesWithResiduals])
def test_ablated_neuron_removal_that_changes_the_model_is_undone_with_the_reason(cls):
    model = cls()
    ss.sparsify(model, None, masks=model.masks)
    with pytest.warns(RuntimeWarning, match="ablated-neuron removal undone"):
        dep = deploy(model, plan="condensed", example_input=torch.randn(2, 8))
    assert dep.mlp[0].out_features == 8 and "ablated-neuron removal undone" in dep.semisparse_plan["undone"][0]
    assert_same(dep, model, torch.randn(3, 8))


class ChecksItsClass(nn.Module):
    """Computes something else when its layer is not a torch Linear: only the reference run can tell."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        x = self.a(x)
        x = self.b(x) if isinstance(self.b, nn.Linear) else -x
        return self.c(x)


def test_a_swap_that_changes_the_outputs_is_found_and_undone_for_that_layer_only():
    torch.manual_seed(0)
    model = ChecksItsClass()
    ss.sparsify(model, 0.5)
    with pytest.warns(RuntimeWarning, match=r"1 layer\(s\) left as torch modules \(b.weight\)"):
        dep = deploy(model, plan="condensed", example_input=torch.randn(1, 6))
    assert type(dep.b) is nn.Linear and isinstance(dep.a, SparseLinear) and isinstance(dep.c, SparseLinear)
    assert "replacing it changed the model's output" in rows(dep)["b.weight"].reason
    assert_same(dep, model, torch.randn(4, 6))


class MHAOwnForward(nn.MultiheadAttention):
    def forward(self, q, k, v, **kw):
        out, w = super().forward(q, k, v, **kw)
        return out * 2, w


def test_attention_subclass_with_its_own_forward_is_left_whole():
    torch.manual_seed(0)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = MHAOwnForward(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    model = Wrap()
    ss.sparsify(model, 0.5)
    dep = deploy(model, plan="condensed", example_input=torch.randn(1, 5, 16))
    assert type(dep.attn) is MHAOwnForward and isinstance(dep.fc, SparseLinear)
    assert_same(dep, model, torch.randn(2, 5, 16))
    r = rows(dep)
    assert "redefines forward" in r["attn.in_proj_weight"].reason and "attn.out_proj.weight" in r


def test_why_not_plain_accepts_plain_layers_and_subclasses_that_keep_torchs_forward():
    class Tagged(nn.Linear):
        tag = "mine"

    assert why_not_plain(nn.Linear(2, 2)) == "" and why_not_plain(Tagged(2, 2)) == ""
    assert why_not_plain(nn.Conv2d(2, 2, 3)) == "" and why_not_plain(nn.MultiheadAttention(4, 2)) == ""
    lin = nn.Linear(2, 2)
    lin.register_full_backward_hook(lambda *a: None)
    assert why_not_plain(lin) == "has backward hooks"
    assert "redefines forward" in why_not_plain(CosineLinear(2, 2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_example", [False, True])
def test_a_float64_or_bf16_model_deploys_in_its_own_dtype(dtype, with_example):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ss.sparsify(model, 0.5)
    model.to(dtype)
    kw = {"example_input": torch.randn(2, 8, dtype=dtype)} if with_example else {}
    condensed_bf16 = dtype == torch.bfloat16 and kernels.available()  # bf16 values, fp32 accumulation
    if condensed_bf16:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*run dense", category=RuntimeWarning)
            dep = deploy(model, **kw)
    else:
        with pytest.warns(RuntimeWarning, match="the model's dtype"):
            dep = deploy(model, **kw)
    x = torch.randn(3, 8, dtype=dtype)
    with torch.no_grad():
        got, want = dep(x), model.eval()(x)
    assert got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if not condensed_bf16:
        assert all(layer.mode == "dense" for _, layer in deployed_layers(dep))


def test_deploy_of_plain_models_warns_nothing():
    torch.manual_seed(0)
    model = _random_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(8 * 4 * 4, 4)))
    ss.sparsify(model, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dep = deploy(model, plan="condensed", example_input=torch.randn(1, 3, 6, 6))
    assert dep.semisparse_plan["folded_bn"] == 1 and not dep.semisparse_plan["undone"]
    assert_same(dep, model, torch.randn(2, 3, 6, 6))


class TwoNamesAndAList(nn.Module):
    """One Linear registered under two names, another reached through a plain list, a cosine Linear, a hook."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.fc_alias = self.fc
        self.cos = CosineLinear(64, 64)
        self.tail = nn.Linear(64, 32)
        self.listed = [self.tail]
        self.tail.register_forward_hook(lambda mod, args, out: out + 1)

    def forward(self, x):
        x = F.relu(self.fc(x))
        x = F.relu(self.fc_alias(x)) + self.cos(x)
        return self.listed[0](x) + self.tail(x)


def test_cuda_deploy_swaps_every_name_of_a_shared_layer_and_only_plain_layers():
    from semisparse.runtime.cuda import EmulatedBackend, deploy_cuda
    from semisparse.runtime.cuda.layers import PlannedLayer

    torch.manual_seed(0)
    model = TwoNamesAndAList().eval()
    ss.sparsify(model, "2:4")
    x = torch.randn(4, 64)
    dep = deploy_cuda(model, torch.float32, example_input=x, backend=EmulatedBackend(), plan="sparse", graph=False)
    inner = dep.module
    assert isinstance(inner.fc, PlannedLayer) and inner.fc_alias is inner.fc
    assert type(inner.cos) is CosineLinear and "CosineLinear redefines forward" in dep.semisparse_plan["kept_dense"][
        "cos.weight"]
    with torch.no_grad():
        got, want = dep(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_second_parametrization_on_a_weight_is_refused_saying_how_to_proceed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    ss.sparsify(model, 0.5)  # ss.sparsify refuses a weight that already has one: here it comes after the mask
    nn.utils.parametrizations.weight_norm(model[0])
    with pytest.raises(ss.SemisparseError, match="remove_parametrizations") as info:
        deploy(model, plan="condensed", example_input=torch.randn(1, 8))
    assert "\n" not in str(info.value) and "0.weight" in str(info.value)


def test_a_root_layer_kept_dense_keeps_its_users_hooks_and_deploys_thread_hooks(monkeypatch):
    from semisparse.runtime.cpu import planner
    from semisparse.runtime.cpu.kept import KeptDenseLinear

    monkeypatch.setattr(planner, "interleaved_medians", lambda fns, *a, **k: [1.0] + [2.0] * (len(fns) - 1))
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    ss.sparsify(lin, 0.5)
    lin.register_forward_hook(lambda mod, args, out: out * 3)
    dep = deploy(lin, example_input=torch.randn(2, 16), reps=1)
    # the thread hooks stay on a model left all torch (a kept-dense layer must not stall on a busy machine)
    assert type(dep) is KeptDenseLinear and dep.semisparse_plan["thread_hooks"] is True
    assert len(dep._forward_hooks) == len(lin._forward_hooks) + 1 and dep._forward_pre_hooks  # user's + deploy's
    assert_same(dep, lin, torch.randn(3, 16))
