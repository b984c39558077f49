"""ss.sparsify / masks / check / finalize / report on real models, against outside references."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import semisparse as ss
from semisparse.masking import sparse_weights


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Linear(12, 4),
    )


def test_magnitude_2_4_on_linear_equals_torch_ao_weight_norm_sparsifier():
    from torch.ao.pruning import WeightNormSparsifier

    torch.manual_seed(1)
    ours, ref = nn.Sequential(nn.Linear(64, 32)), None
    ref = copy.deepcopy(ours)
    sp = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sp.prepare(ref, [{"tensor_fqn": "0.weight"}])
    sp.step()
    ss.sparsify(ours, "2:4")
    assert torch.equal(ss.masks(ours)["0.weight"], ref[0].parametrizations.weight[0].mask.bool())


TORCHVISION = ["resnet18", "resnet50", "convnext_tiny", "mobilenet_v3_large", "vit_b_16"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_every_eligible_layer_is_exactly_2_4_along_input_channels(name):
    model = getattr(torchvision.models, name)(weights=None)
    size = 224 if name.startswith("vit") else 64
    x = torch.randn(1, 3, size, size)
    rep = ss.sparsify(model, "2:4", example_input=x)
    masks = ss.masks(model)
    expected = {}
    for mod_name, mod in model.named_modules():
        key = (mod_name + ".") if mod_name else ""
        if isinstance(mod, nn.MultiheadAttention):
            expected[key + "in_proj_weight"] = True
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            w = mod.parametrizations.weight.original if hasattr(mod, "parametrizations") else mod.weight
            expected[key + "weight"] = w.shape[1] % 4 == 0  # depthwise / RGB stem are not
    assert {k for k, ok in expected.items() if ok} == set(masks)
    for key, mask in masks.items():
        if mask.dim() == 4:  # groups of 4 consecutive input channels at each tap, checked by hand
            counts = mask.permute(0, 2, 3, 1).reshape(*mask.shape[:1], *mask.shape[2:], -1, 4).sum(-1)
        else:
            counts = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        assert bool((counts == 2).all()), key
    eligible_macs = sum(r.macs for r in rep.layers if expected.get(r.name))
    sparse_macs = sum(r.macs for r in rep.sparse_layers)
    assert sparse_macs >= 0.99 * eligible_macs
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    ss.check(model)


def test_resnet18_report_shows_coverage_and_reasons():
    model = torchvision.models.resnet18(weights=None)
    rep = ss.sparsify(model, "2:4", example_input=torch.randn(1, 3, 64, 64))
    stem = next(r for r in rep.layers if r.name == "conv1.weight")
    assert stem.pattern == "dense" and "3 input channels" in stem.reason
    assert 0.9 < rep.mac_share < 1.0 and rep.param_share > 0.99
    text = str(rep)
    assert "layer1.0.conv1.weight" in text and "of MACs sparse" in text
    d = rep.to_dict()
    assert d["layers"][0]["name"] == "conv1.weight" and abs(d["density"] - 0.5) < 1e-9


def test_dense_weight_underneath_is_kept_and_effective_weight_masked():
    model = small_cnn()
    before = model[3].weight.detach().clone()
    ss.sparsify(model, "2:4")
    assert torch.equal(model[3].parametrizations.weight.original, before)
    assert torch.equal(model[3].weight, before * ss.masks(model)["3.weight"])


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_masked_weights_stay_zero_after_optimizer_steps(opt_cls):
    model = small_cnn()
    ss.sparsify(model, "2:4")
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2} if opt_cls is torch.optim.SGD else {"lr": 1e-2}
    opt = opt_cls(model.parameters(), **kw)
    masks = ss.masks(model)
    for _ in range(3):
        loss = model(torch.randn(4, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for sw in sparse_weights(model):
        w = getattr(sw.module, sw.param)
        assert bool((w[~masks[sw.key]] == 0).all())
        assert int((w != 0).sum()) == int(masks[sw.key].sum())  # kept ones did train away from zero
    ss.check(model)


def test_state_dict_round_trips_into_a_freshly_sparsified_model():
    a = small_cnn()
    ss.sparsify(a, "2:4")
    sd = a.state_dict()
    assert "3.parametrizations.weight.original" in sd and "3.parametrizations.weight.0.mask" in sd
    b = small_cnn()
    with torch.no_grad():
        for p in b.parameters():
            p.normal_()
    ss.sparsify(b, "2:4")
    b.load_state_dict(sd)
    assert all(torch.equal(ss.masks(a)[k], ss.masks(b)[k]) for k in ss.masks(a))
    a.eval(), b.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(a(x), b(x))


def test_finalize_keeps_original_keys_and_outputs():
    model = small_cnn().eval()
    keys = list(model.state_dict())
    ss.sparsify(model, "2:4")
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    masks = ss.masks(model)
    ss.finalize(model)
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), before)
    assert bool((model[3].weight[~masks["3.weight"]] == 0).all())
    assert not list(sparse_weights(model))


def test_masks_from_another_copy_are_applied_unchanged():
    a = small_cnn()
    ss.sparsify(a, "2:4", method="random", seed=3)
    b = small_cnn()
    with torch.no_grad():
        b[3].weight.mul_(-3)
    ss.sparsify(b, masks=ss.masks(a))
    assert ss.masks(b).keys() == ss.masks(a).keys()
    assert all(torch.equal(ss.masks(a)[k], ss.masks(b)[k]) for k in ss.masks(a))


def test_given_mask_that_breaks_the_pattern_is_refused_naming_the_layer():
    a = small_cnn()
    ss.sparsify(a, "2:4")
    bad = ss.masks(a)
    bad["3.weight"][0, 0, 0, 0] = ~bad["3.weight"][0, 0, 0, 0]
    b = small_cnn()
    with pytest.raises(ss.PatternError, match=r"3\.weight"):
        ss.sparsify(b, "2:4", masks=bad)
    assert not list(sparse_weights(b))
    with pytest.raises(ss.SemisparseError, match="shape"):
        ss.sparsify(b, "2:4", masks={"3.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ss.SemisparseError, match="not sparsifiable"):
        ss.sparsify(b, "2:4", masks={"nope.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_fan_in_pattern_keeps_exactly_k_per_neuron_everywhere():
    model = small_cnn()
    ss.sparsify(model, 0.75)
    for key, mask in ss.masks(model).items():
        rows = mask.reshape(mask.shape[0], -1)
        k = max(1, round(0.25 * rows.shape[1]))
        assert bool((rows.sum(1) == k).all()), key
    assert "5.weight" in ss.masks(model)  # depthwise included for fan-in
    ss.check(model)


def test_random_method_is_seeded_and_valid():
    a, b = small_cnn(), small_cnn()
    ss.sparsify(a, "1:4", method="random", seed=7)
    ss.sparsify(b, "1:4", method="random", seed=7)
    assert all(torch.equal(ss.masks(a)[k], ss.masks(b)[k]) for k in ss.masks(a))
    ss.check(a)
    c = small_cnn()
    ss.sparsify(c, "1:4", method="magnitude")
    assert any(not torch.equal(ss.masks(a)[k], ss.masks(c)[k]) for k in ss.masks(a))


def test_check_raises_pattern_error_naming_the_tampered_layer():
    model = small_cnn()
    ss.sparsify(model, "2:4")
    ss.check(model)
    model[8].parametrizations.weight[0].mask[0, :4] = True
    with pytest.raises(ss.PatternError, match=r"8\.weight"):
        ss.check(model)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"pattern": "3:2"}, "0 < N < M"),
        ({"pattern": "0:4"}, "0 < N < M"),
        ({"pattern": 1.5}, r"sparsity must be a float in \(0, 1\)"),
        ({"pattern": -0.1}, r"sparsity must be a float in \(0, 1\)"),
        ({"method": "topk"}, "unknown method 'topk'; expected one of magnitude, random, gumbel"),
        ({"pattern": "2:4", "seed": 1}, "unknown option"),
        ({"pattern": "2:4", "shared_rows": 0}, "shared_rows must be an int >= 1"),
        ({"pattern": "2:4", "shared_rows": 2.0}, "shared_rows must be an int >= 1"),
        ({"pattern": "2:4", "method": "gumbel", "total_steps": 4, "shared_rows": 0}, "shared_rows must be an int >= 1"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_model_unmodified(kwargs, match):
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ss.SemisparseError, match=match):
        ss.sparsify(model, **kwargs)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


@pytest.mark.parametrize("pattern,method", [("2:4", "magnitude"), (0.75, "magnitude"), ("2:4", "random")])
def test_shared_rows_give_each_block_of_4_neurons_the_same_positions_and_keep_the_pattern(pattern, method):
    model = small_cnn()
    ss.sparsify(model, pattern, method=method, shared_rows=4)
    ss.check(model)  # every row still N:M / constant fan-in
    assert len(ss.masks(model)) >= 2
    for key, mask in ss.masks(model).items():
        rows = mask.flatten(1)
        for start in range(0, rows.shape[0], 4):
            assert bool((rows[start:start + 4] == rows[start]).all()), key
    if method == "magnitude" and pattern == "2:4":  # each block keeps its largest summed magnitudes
        layer = model[3]  # Conv2d(8, 16, 3): groups of 4 input channels per kernel tap
        w = layer.parametrizations.weight.original.detach().permute(0, 2, 3, 1)  # (out, kh, kw, in)
        kept = ss.masks(model)["3.weight"].permute(0, 2, 3, 1)
        block = w.abs().reshape(4, 4, -1, 4).sum(1)  # (blocks, groups, 4)
        top = block.topk(2, 2).indices.sort(2).values
        assert torch.equal(kept.reshape(4, 4, -1, 4)[:, 0].nonzero()[:, 2].view(4, -1, 2), top)


def test_model_without_eligible_layers_is_an_error():
    with pytest.raises(ss.SemisparseError, match="no layer of this model can take"):
        ss.sparsify(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), "2:4")
    with pytest.raises(ss.SemisparseError, match="not a multiple of 4"):
        ss.sparsify(nn.Linear(6, 3), "2:4")


def test_sparsifying_twice_needs_overwrite():
    model = small_cnn()
    ss.sparsify(model, "2:4")
    first = ss.masks(model)
    with pytest.raises(ss.SemisparseError, match="already sparsified.*overwrite=True"):
        ss.sparsify(model, "1:4")
    assert all(torch.equal(first[k], v) for k, v in ss.masks(model).items())
    ss.sparsify(model, "1:4", overwrite=True)
    assert all(int(v.sum()) * 4 == v.numel() for v in ss.masks(model).values())
    assert len(list(sparse_weights(model))) == len(first)


def test_torch_compile_matches_eager():
    model = small_cnn().eval()
    ss.sparsify(model, "2:4")
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="eager" if not hasattr(torch, "_inductor") else "inductor")
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_finalizing_a_deep_copy_leaves_the_original_sparsified():
    model = small_cnn().eval()
    ss.sparsify(model, "2:4")
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    twin = copy.deepcopy(model)
    ss.finalize(twin)
    assert torch.equal(model(x), before) and torch.equal(twin(x), before)
    assert list(ss.masks(model)) == ["3.weight", "8.weight", "10.weight"] and not ss.masks(twin)
    ss.finalize(model)
    assert torch.equal(model(x), before)
