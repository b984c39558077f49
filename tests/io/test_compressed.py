"""Compressed checkpoints: exact round trips, the byte budget, the 2:4 metadata form, corrupted files."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import semisparse as ss
from helpers.resave import resave
from helpers.threads import one_thread  # noqa: F401 - autouse: one torch thread here
from semisparse import models
from semisparse.io import codec
from semisparse.io import compressed as ck
from semisparse.layout import Layout
from semisparse.masking import Mask, parametrization_of
from semisparse.patterns import NM


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64, bias=False),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def fresh_like(model: nn.Module) -> nn.Module:
    """Same architecture, different (random) values, so a load must really fill it."""
    torch.manual_seed(123)
    return small_cnn() if isinstance(model, nn.Sequential) else type(model)()


def assert_same_sparse_model(a: nn.Module, b: nn.Module, *, dense_underneath: bool, x=None) -> None:
    ma, mb = ss.masks(a), ss.masks(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
        pa, pb = parametrization_of(a, k), parametrization_of(b, k)
        assert pa.target == pb.target and pa.layout == pb.layout, k
    ss.check(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k.endswith(".original") and not dense_underneath:
            key = k.replace(".parametrizations.", ".").removesuffix(".original")
            assert torch.equal(sb[k], sa[k] * ma[key]), k  # the effective weight
        else:
            assert torch.equal(sa[k], sb[k]), k
    a.eval(), b.eval()
    x = torch.randn(3, 3, 12, 12) if x is None else x
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize(
    "pattern, pad",
    [("2:4", False), ("2:4", True), ("1:4", True), ("4:8", False), ("3:8", True), (0.9, False), (0.5, False)],
)
@pytest.mark.parametrize("keep_dense", [False, True])
def test_round_trip_is_exact(tmp_path, pattern, pad, keep_dense):
    model = small_cnn()
    ss.sparsify(model, pattern, pad=pad)
    path = ck.save(model, tmp_path / "m.safetensors", keep_dense=keep_dense)
    loaded = ss.load(path, model=fresh_like(model))
    assert_same_sparse_model(model, loaded, dense_underneath=keep_dense)


def test_loading_into_a_deep_copy_leaves_the_original_model_working(tmp_path):
    # the copy shares parametrize's generated class with the original: removing the copy's masks must not
    # delete the original's weight property
    model = small_cnn().eval()
    ss.sparsify(model, "2:4")
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        before = model(x)
    path = ck.save(model, tmp_path / "m.safetensors")
    loaded = ss.load(path, model=copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(model(x), before)
        assert torch.equal(loaded.eval()(x), before)
    assert ss.masks(model).keys() == ss.masks(loaded).keys()


def test_padded_taps_layout_round_trips_with_short_groups(tmp_path):
    # 2:4 on a depthwise conv: 9 taps -> groups of 4, 4 and 1 real + 3 padding (keeps 2, 2, 1)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=1))
    ss.sparsify(model, "2:4", pad=True)
    assert parametrization_of(model, "0.weight").layout.mode == "taps"
    loaded = ss.load(
        ck.save(model, tmp_path / "dw.safetensors"),
        model=nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=1)),
    )
    assert_same_sparse_model(model, loaded, dense_underneath=False, x=torch.randn(2, 8, 6, 6))
    assert int(ss.masks(loaded)["0.weight"].sum()) == 8 * (2 + 2 + 1)


def test_constant_fanin_with_ablated_neurons_round_trips(tmp_path):
    model = small_cnn()
    ss.sparsify(model, 0.8)
    mask = ss.masks(model)
    for key in ("3.weight", "8.weight"):  # ablate a few neurons: rows with no kept weight at all
        mask[key][[0, 5, 7]] = False
    fresh = small_cnn()
    ss.sparsify(fresh, 0.8, masks=mask)
    with torch.no_grad():
        for (ka, a), (kb, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
            assert ka == kb
            if not ka.endswith(".mask"):
                b.copy_(a)
    path = ck.save(fresh, tmp_path / "abl.safetensors")
    header = ck.read_header(path)
    assert header["layers"]["3.weight"]["alive"] == 32 - 3
    assert header["layers"]["8.weight"]["encoding"] == "fanin"
    loaded = ss.load(path, model=fresh_like(model))
    assert_same_sparse_model(fresh, loaded, dense_underneath=False)
    assert not ss.masks(loaded)["3.weight"][[0, 5, 7]].any()


@pytest.mark.parametrize("width, kind", [(40_000, "int16"), (65_536, "int16"), (70_000, "int32")])
def test_fanin_indices_int16_read_unsigned_and_int32_beyond(tmp_path, width, kind):
    lin = nn.Sequential(nn.Linear(width, 3))
    scores = torch.zeros(3, width)
    scores[:, [0, 1, 32_767, 32_768, width - 1]] = 1.0  # indices on both sides of the int16 sign bit
    ss.sparsify(lin, 0.99, masks={"0.weight": scores.bool()})
    path = ck.save(lin, tmp_path / "wide.safetensors")
    assert ck.read_header(path)["layers"]["0.weight"]["index_dtype"] == kind
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("0.weight::cols").dtype == {"int16": torch.int16, "int32": torch.int32}[kind]
    loaded = ss.load(path, model=nn.Sequential(nn.Linear(width, 3)))
    assert torch.equal(ss.masks(loaded)["0.weight"], scores.bool())
    assert parametrization_of(loaded, "0.weight").target == 5


@pytest.mark.parametrize("density, encoding", [(0.5, "bitmap"), (0.01, "csr")])
def test_unstructured_masks_pick_the_smaller_encoding(tmp_path, density, encoding):
    model = small_cnn()
    gen = torch.Generator().manual_seed(1)
    masks = {
        k: torch.rand(v.shape, generator=gen) < density
        for k, v in model.state_dict().items()
        if k.endswith("weight") and v.dim() > 1
    }
    ss.sparsify(model, None, masks=masks)
    path = ck.save(model, tmp_path / "u.safetensors")
    header = ck.read_header(path)
    for key, e in header["layers"].items():  # the encoding is whichever is smaller for that layer
        rows, width = e["rows"], e["width"]
        csr, bitmap = 2 * e["kept"] + 4 * rows, (rows * width + 7) // 8
        assert e["encoding"] == ("csr" if csr < bitmap else "bitmap"), key
    assert header["layers"]["8.weight"]["encoding"] == encoding
    assert all(e["target"] == {"kind": "unstructured"} for e in header["layers"].values())
    loaded = ss.load(path, model=fresh_like(model))
    assert_same_sparse_model(model, loaded, dense_underneath=False)


def test_2to4_metadata_is_two_bits_per_kept_value_four_per_byte(tmp_path):
    lin = nn.Sequential(nn.Linear(8, 2, bias=False))
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1], [0, 0, 1, 1, 1, 0, 1, 0]], dtype=torch.bool)
    ss.sparsify(lin, "2:4", masks={"0.weight": mask})
    path = ck.save(lin, tmp_path / "nm.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.get_tensor("0.weight::nm")
        values = f.get_tensor("0.weight::values")
    # row 0 keeps group positions (0,1),(1,3); row 1 (2,3),(0,2); first value in the low bits
    expected = [0 | 1 << 2 | 1 << 4 | 3 << 6, 2 | 3 << 2 | 0 << 4 | 2 << 6]
    assert meta.dtype == torch.uint8 and meta.tolist() == expected
    assert torch.equal(values, lin[0].parametrizations.weight.original.detach()[mask])


def test_mha_packed_qkv_round_trips(tmp_path):
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.MultiheadAttention(16, 4, batch_first=True))

    model = net()
    ss.sparsify(model, 0.75)
    assert "0.in_proj_weight" in ss.masks(model)
    loaded = ss.load(ck.save(model, tmp_path / "mha.safetensors"), model=net())
    ss.check(loaded)
    x = torch.randn(2, 5, 16)
    assert torch.equal(model[0](x, x, x)[0], loaded[0](x, x, x)[0])


def test_dense_model_saves_and_loads_unchanged(tmp_path):
    model = small_cnn()
    loaded = ss.load(ck.save(model, tmp_path / "d.safetensors"), model=fresh_like(model))
    assert not ss.masks(loaded)
    for (ka, a), (kb, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(a, b)


def test_fp16_file_holds_rounded_values_and_finalize_restores_keys(tmp_path):
    model = small_cnn()
    keys = list(model.state_dict())
    ss.sparsify(model, "2:4")
    path = ck.save(model, tmp_path / "h.safetensors", dtype=torch.float16)
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("3.weight::values").dtype == torch.float16
        assert f.get_tensor("1.running_var").dtype == torch.float16
        assert f.get_tensor("1.num_batches_tracked").dtype == torch.int64
    loaded = ss.load(path, model=fresh_like(model))
    w = ss.finalize(loaded)[3].weight
    ref = (model[3].weight.detach()).half().float()
    assert torch.equal(w, ref)
    assert list(loaded.state_dict()) == keys


def _linear_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])


def _dense_file_bytes(model: nn.Module, tmp_path, dtype) -> int:
    sd = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "dense.safetensors"))
    return os.path.getsize(tmp_path / "dense.safetensors")


def test_size_budget_2to4_fp16_and_90pct_fanin_fp32(tmp_path):
    model = _linear_stack()
    dense16 = _dense_file_bytes(model, tmp_path, torch.float16)
    dense32 = _dense_file_bytes(model, tmp_path, torch.float32)
    ss.sparsify(model, "2:4")
    nm = os.path.getsize(ck.save(model, tmp_path / "a.safetensors", dtype=torch.float16))
    ss.sparsify(model, 0.9, overwrite=True)
    fanin = os.path.getsize(ck.save(model, tmp_path / "b.safetensors"))
    assert nm / dense16 <= 0.6, nm / dense16
    assert fanin / dense32 <= 0.2, fanin / dense32
    assert ck.sizes(tmp_path / "b.safetensors")["ratio"] <= 0.2


@pytest.mark.slow
def test_size_budget_on_resnet18(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    dense16 = _dense_file_bytes(model, tmp_path, torch.float16)
    dense32 = _dense_file_bytes(model, tmp_path, torch.float32)
    ss.sparsify(model, "2:4")
    assert os.path.getsize(ck.save(model, tmp_path / "a.safetensors", dtype=torch.float16)) <= 0.6 * dense16
    ss.sparsify(model, 0.9, overwrite=True)
    path = ck.save(model, tmp_path / "b.safetensors")
    assert os.path.getsize(path) <= 0.2 * dense32
    loaded = ss.load(path, model=torchvision.models.resnet18(weights=None))
    assert_same_sparse_model(model, loaded, dense_underneath=False)


# ------------------------------------------------------------------------------------ rebuild by name


def test_load_rebuilds_the_recorded_architecture(tmp_path, monkeypatch):
    calls = []

    def tiny(num_classes=1000, **kw):
        calls.append(("tiny", num_classes, kw))
        return small_cnn()

    monkeypatch.setitem(models.MODELS, "tiny", tiny)
    model = small_cnn()
    model.semisparse_arch = {"name": "tiny", "num_classes": 10, "width": 1}
    ss.sparsify(model, 0.9)
    path = ck.save(model, tmp_path / "arch.safetensors")
    loaded = ss.load(path)
    assert calls == [("tiny", 10, {"width": 1})] * 2  # on the meta device (shapes compared), then for real
    assert_same_sparse_model(model, loaded, dense_underneath=False)


def test_load_without_arch_or_model_is_a_clear_error(tmp_path):
    path = ck.save(small_cnn(), tmp_path / "noarch.safetensors")
    with pytest.raises(ss.SemisparseError, match="records no model architecture"):
        ss.load(path)


def test_registry_model_round_trip(tmp_path):
    models = pytest.importorskip("semisparse.models")
    model = models.create_model("digits_cnn", num_classes=10)
    ss.sparsify(model, 0.9)
    loaded = ss.load(ck.save(model, tmp_path / "r.safetensors"))
    assert loaded.semisparse_arch == model.semisparse_arch
    assert_same_sparse_model(model, loaded, dense_underneath=False, x=torch.randn(2, 1, 8, 8))


def test_load_into_a_sparsified_model_replaces_its_masks(tmp_path):
    model = small_cnn()
    ss.sparsify(model, "2:4")
    path = ck.save(model, tmp_path / "m.safetensors")
    other = fresh_like(model)
    ss.sparsify(other, 0.9)
    assert_same_sparse_model(model, ss.load(path, model=other), dense_underneath=False)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = ck.save(small_cnn(), tmp_path / "m.safetensors")
    with pytest.raises(ss.SemisparseError, match="does not match the file"):
        ss.load(path, model=nn.Sequential(nn.Linear(3, 3)))
    wider = small_cnn()
    wider[10] = nn.Linear(64, 11)
    with pytest.raises(ss.SemisparseError, match="shape"):
        ss.load(path, model=wider)


# --------------------------------------------------------------------------------- corrupted files


@pytest.fixture
def saved(tmp_path):
    model = small_cnn()
    ss.sparsify(model, "2:4")
    return ck.save(model, tmp_path / "ok.safetensors")


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1])
def test_truncated_file_is_rejected(saved, tmp_path, keep):
    data = saved.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:n])
    with pytest.raises(ss.SemisparseError):
        ss.load(bad, model=small_cnn())


def test_flipped_data_byte_is_rejected(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[-10] ^= 0x40
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ss.SemisparseError, match="digest"):
        ss.load(bad, model=small_cnn())


def test_edited_header_json_is_rejected(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    n = int.from_bytes(data[:8], "little")
    head = data[8 : 8 + n].decode()
    i = head.index('\\"version\\"')
    bad = tmp_path / "head.safetensors"
    bad.write_bytes(bytes(data[:8]) + (head[:i] + "X" + head[i + 1 :]).encode() + bytes(data[8 + n :]))
    with pytest.raises(ss.SemisparseError):
        ss.load(bad, model=small_cnn())


def test_plain_safetensors_and_garbage_are_rejected(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ss.SemisparseError, match="not a semisparse"):
        ss.load(tmp_path / "plain.safetensors", model=small_cnn())
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(300))
    with pytest.raises(ss.SemisparseError, match="not a valid safetensors"):
        ss.load(tmp_path / "junk.safetensors", model=small_cnn())
    with pytest.raises(FileNotFoundError):
        ss.load(tmp_path / "missing.safetensors")


def _rewrite(path, out, edit_tensors=None, edit_header=None):
    """Re-save with edited tensors / header and a *recomputed* digest: only the semantic checks remain."""
    return resave(path, out, edit_tensors, edit_header, digest_of=ck._file_digest)


def _fanin_file(tmp_path):
    model = small_cnn()
    ss.sparsify(model, 0.9)
    return ck.save(model, tmp_path / "f.safetensors")


def _set(t, name, fn):
    t[name] = fn(t[name].clone())


@pytest.mark.parametrize(
    "case, edit_tensors, edit_header, match",
    [
        (
            "fanin index out of range",
            lambda t: _set(t, "8.weight::cols", lambda c: c.index_fill_(1, torch.tensor([0]), 500)),
            None,
            "out of range",
        ),
        (
            "fanin index repeated",
            lambda t: _set(t, "8.weight::cols", lambda c: c.index_copy_(1, torch.tensor([1]), c[:, :1])),
            None,
            "not increasing",
        ),
        ("alive bitmap flipped", lambda t: _set(t, "8.weight::alive", lambda a: a ^ 1), None, "alive rows"),
        (
            "values missing one",
            lambda t: _set(t, "8.weight::values", lambda v: v[:-1]),
            None,
            "stored values",
        ),
        ("values wrong dtype", lambda t: _set(t, "8.weight::values", lambda v: v.double()), None, "dtype"),
        ("k changed", None, lambda h: h["layers"]["8.weight"]["target"].update(k=7), "do not match"),
        ("shape changed", None, lambda h: h["layers"]["8.weight"].update(shape=[64, 64]), "does not match"),
        ("extra tensor", lambda t: t.update(extra=torch.ones(1)), None, "do not match the header"),
        ("dense tensor missing", lambda t: t.pop("1.running_mean"), None, "do not match the header"),
        (
            "unknown encoding",
            None,
            lambda h: h["layers"]["8.weight"].update(encoding="zip"),
            "unknown encoding",
        ),
        ("version", None, lambda h: h.update(version=99), "version"),
    ],
)
def test_semantically_wrong_fanin_file_is_rejected(tmp_path, case, edit_tensors, edit_header, match):
    bad = _rewrite(_fanin_file(tmp_path), tmp_path / "bad.safetensors", edit_tensors, edit_header)
    with pytest.raises(ss.SemisparseError, match=match):
        ss.load(bad, model=small_cnn())


@pytest.mark.parametrize(
    "edit_tensors, edit_header, match",
    [
        (lambda t: _set(t, "5.weight::nm", lambda b: b[:-1]), None, "metadata has"),
        (lambda t: _set(t, "5.weight::nm", lambda b: b.fill_(0)), None, "repeated within a group"),
        (None, lambda h: h["layers"]["5.weight"]["target"].update(n=1), "kept values"),
        (None, lambda h: h["layers"]["5.weight"].update(target={"kind": "fanin", "k": 2}), "target"),
    ],
)
def test_semantically_wrong_nm_file_is_rejected(saved, tmp_path, edit_tensors, edit_header, match):
    bad = _rewrite(saved, tmp_path / "bad.safetensors", edit_tensors, edit_header)
    with pytest.raises(ss.SemisparseError, match=match):
        ss.load(bad, model=small_cnn())


def test_failed_save_leaves_the_previous_file_and_no_temp_files(tmp_path):
    model = small_cnn()
    ss.sparsify(model, "2:4")
    path = ck.save(model, tmp_path / "m.safetensors")
    before = path.read_bytes()
    parametrization_of(model, "5.weight").mask[0, :4] = True  # breaks 2:4
    with pytest.raises(ss.PatternError):
        ck.save(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# ------------------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 12), data=st.data())
def test_pack_bits_round_trips(bits, data):
    vals = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=50))
    t = torch.tensor(vals, dtype=torch.int64)
    packed = codec.pack_bits(t, bits)
    assert packed.numel() == (len(vals) * bits + 7) // 8
    assert torch.equal(codec.unpack_bits(packed, bits, len(vals)).long(), t)


@settings(max_examples=25, deadline=None)
@given(
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (5, 8), (1, 3), (2, 6)]),
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    conv=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_nm_masks_round_trip(tmp_path_factory, nm, rows, groups, conv, seed):
    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    if conv:
        mod = nn.Conv2d(m * groups, rows, (1, 2), bias=False)
    else:
        mod = nn.Linear(m * groups, rows, bias=False)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))
    model = nn.Sequential(mod)
    ss.sparsify(model, f"{n}:{m}", method="random", seed=seed)
    path = ck.save(model, tmp_path_factory.mktemp("nm") / "p.safetensors")
    fresh = nn.Sequential(
        nn.Conv2d(m * groups, rows, (1, 2), bias=False) if conv else nn.Linear(m * groups, rows, bias=False)
    )
    loaded = ss.load(path, model=fresh)
    assert parametrization_of(loaded, "0.weight").target == NM(n, m)
    assert torch.equal(ss.masks(loaded)["0.weight"], ss.masks(model)["0.weight"])
    assert torch.equal(loaded[0].weight, model[0].weight)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 8), width=st.integers(2, 40), data=st.data())
def test_random_fanin_masks_with_ablation_round_trip(tmp_path_factory, rows, width, data):
    k = data.draw(st.integers(1, width))
    alive = data.draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for r in range(rows):
        if alive[r]:
            mask[r, torch.randperm(width, generator=gen)[:k]] = True
    model = nn.Sequential(nn.Linear(width, rows))
    if not mask.any():
        return
    mask_target = int(mask.sum(1).max())
    p = Mask(mask, Layout("rows", (rows, width)), mask_target)
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", p)
    path = ck.save(model, tmp_path_factory.mktemp("fi") / "p.safetensors")
    loaded = ss.load(path, model=nn.Sequential(nn.Linear(width, rows)))
    assert parametrization_of(loaded, "0.weight").target == mask_target
    assert torch.equal(ss.masks(loaded)["0.weight"], mask)
    assert torch.equal(loaded[0].weight, model[0].weight)
    assert (
        ck.read_header(path)["layers"]["0.weight"]["kept"]
        == int(mask.sum())
        == math.prod((int(mask.any(1).sum()), k))
    )


def test_learned_masks_are_saved_as_their_argmax_mask(tmp_path):
    pytest.importorskip("semisparse.masking.gumbel")
    model = small_cnn()
    ss.sparsify(model, "2:4", method="gumbel", total_steps=10)
    path = ck.save(model, tmp_path / "g.safetensors")
    loaded = ss.load(path, model=fresh_like(model))
    assert all(isinstance(parametrization_of(loaded, k), Mask) for k in ss.masks(loaded))
    assert all(parametrization_of(loaded, k).target == NM(2, 4) for k in ss.masks(loaded))
    model.eval(), loaded.eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_loaded_model_deploys_to_the_masked_dense_outputs(tmp_path):
    deploy = getattr(pytest.importorskip("semisparse.runtime"), "deploy", None)
    if deploy is None:
        pytest.skip("ss.deploy not available yet")
    model = small_cnn()
    ss.sparsify(model, 0.9)
    loaded = ss.load(ck.save(model, tmp_path / "d.safetensors"), model=fresh_like(model))
    fast = deploy(loaded, plan="condensed")
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model.eval()(x)
        assert float((fast(x) - ref).abs().max() / ref.abs().max()) <= 1e-5
