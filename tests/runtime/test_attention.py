"""Deployed attention: nn.MultiheadAttention in every form, and PyTorch's own transformer layers (whose fused
fast path reads the weights directly) compute what the masked model computes and refuse what it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import semisparse as ss
from semisparse.runtime import deploy, deployed_layers
from semisparse.runtime.attention import SparseMultiheadAttention


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    assert err <= rtol, f"max relative error {err:.2e} > {rtol}"


def both(mha: nn.Module, *args, **kw):
    dep = deploy(mha, plan="condensed")
    with torch.no_grad():
        return dep, dep(*args, **kw), mha.eval()(*args, **kw)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_with_kdim_vdim_uses_the_masked_separate_projections(batch_first, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=12, vdim=4, batch_first=batch_first)
    ss.sparsify(mha, 0.5)
    q, k, v = torch.randn(3, 5, 8), torch.randn(3, 7, 12), torch.randn(3, 7, 4)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    dep, (y, w), (ry, rw) = both(mha, q, k, v, need_weights=need_weights)
    assert isinstance(dep, SparseMultiheadAttention)
    assert {layer.key for _, layer in deployed_layers(dep)} == {"q_proj_weight", "k_proj_weight", "v_proj_weight",
                                                                "out_proj.weight"}
    assert_close(y, ry)
    if need_weights:
        assert_close(w, rw)
    else:
        assert w is None and rw is None


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("same", [True, False])
def test_unbatched_input_is_one_sequence_whatever_batch_first(batch_first, need_weights, same):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    ss.sparsify(mha, 0.5)
    q = torch.randn(5, 16)
    k = q if same else torch.randn(9, 16)  # key of another length than the query
    _, (y, w), (ry, rw) = both(mha, q, k, k, need_weights=need_weights, average_attn_weights=False)
    assert_close(y, ry)
    if need_weights:
        assert w.shape == (4, 5, k.shape[0])
        assert_close(w, rw)


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_of_other_lengths_with_padding_and_attn_masks(batch_first):
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    ss.sparsify(mha, 0.75)
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    for attn_mask in (torch.rand(3, 6) < 0.3, torch.randn(8, 3, 6)):
        kp = pad if attn_mask.dtype == torch.bool else torch.zeros(2, 6).masked_fill(pad, float("-inf"))
        for need_weights in (True, False):
            _, (y, _), (ry, _) = both(mha, q, k, v, key_padding_mask=kp, attn_mask=attn_mask,
                                      need_weights=need_weights)
            assert_close(y, ry)


def test_bias_kv_add_zero_attn_and_no_bias():
    torch.manual_seed(3)
    for kw in (dict(add_bias_kv=True), dict(add_zero_attn=True), dict(bias=False), dict(add_bias_kv=True,
                                                                                        add_zero_attn=True)):
        mha = nn.MultiheadAttention(12, 3, batch_first=True, **kw)
        ss.sparsify(mha, 0.5)
        x = torch.randn(2, 5, 12)
        pad = torch.zeros(2, 5, dtype=torch.bool)
        pad[1, 3:] = True
        dep, (y, w), (ry, rw) = both(mha, x, x, x, key_padding_mask=pad)
        assert isinstance(dep, SparseMultiheadAttention), kw
        assert_close(y, ry)
        assert_close(w, rw)


def test_causal_hint_follows_torch():
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    ss.sparsify(mha, 0.5)
    x = torch.randn(2, 6, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    for need_weights in (True, False):
        _, (y, _), (ry, _) = both(mha, x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
        assert_close(y, ry)
    dep = deploy(mha, plan="condensed")
    for model in (mha, dep):
        with pytest.raises(RuntimeError, match="Need attn_mask"):
            model(x, x, x, is_causal=True)


@pytest.mark.parametrize("args", [
    lambda: (torch.randn(2, 5, 12), torch.randn(2, 5, 12), torch.randn(2, 5, 12)),  # wrong embedding size
    lambda: (torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 6, 16)),  # key and value lengths differ
    lambda: (torch.randn(2, 5, 16), torch.randn(5, 16), torch.randn(5, 16)),  # batched query, unbatched key
    lambda: (torch.randn(2, 3, 5, 16),) * 3,  # 4-D
])
def test_mha_refuses_what_torch_refuses(args):
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    ss.sparsify(mha, 0.5)
    dep = deploy(mha, plan="condensed")
    a = args()
    with torch.no_grad():
        with pytest.raises((AssertionError, RuntimeError)) as want:
            mha.eval()(*a)
        with pytest.raises(want.type):
            dep(*a)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_layer_batch_first_in_eval(norm_first, activation):
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=norm_first, activation=activation)
    ss.sparsify(layer, 0.5)
    x = torch.randn(3, 7, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    for kw in ({}, {"src_key_padding_mask": pad}, {"src_mask": nn.Transformer.generate_square_subsequent_mask(7),
                                                   "is_causal": True}):
        dep, y, ry = both(layer, x, **kw)
        assert isinstance(dep, nn.TransformerEncoderLayer)
        assert_close(y, ry)
    assert len(deployed_layers(dep)) == 4  # in_proj, out_proj, linear1, linear2


def test_transformer_encoder_layer_takes_a_nested_batch_as_torch_does():
    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    ss.sparsify(layer, 0.5)
    x = torch.nested.nested_tensor([torch.randn(5, 16), torch.randn(3, 16)])
    dep, y, ry = both(layer, x)
    assert y.is_nested
    for a, b in zip(y.unbind(), ry.unbind()):
        assert_close(a, b)


@pytest.mark.parametrize("grad", [False, True])
def test_transformer_encoder_with_padding_zeroes_padded_positions_like_its_fast_path(grad):
    torch.manual_seed(8)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2,
                                norm=nn.LayerNorm(16), enable_nested_tensor=True)
    ss.sparsify(enc, 0.5)
    enc.eval()
    dep = deploy(enc, plan="condensed")
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 1:] = True
    # The deployed copy requires no grad, so with grad enabled too it takes the path the masked model takes for
    # inference (no_grad): the nested-batch fast path, whose padded positions are exactly the norm of zeros.
    zeros = enc.norm(torch.zeros(16)).detach()
    for kw in ({}, {"src_key_padding_mask": pad}, {"mask": torch.rand(6, 6) < 0.2}):
        with torch.no_grad():
            want = enc(x, **kw)
        with torch.set_grad_enabled(grad):
            assert_close(dep(x, **kw), want)
    with torch.set_grad_enabled(grad):
        assert torch.equal(dep(x, src_key_padding_mask=pad)[pad].detach(), zeros.expand(int(pad.sum()), 16))


def test_transformer_decoder_layer_and_whole_transformer():
    torch.manual_seed(9)
    model = nn.Transformer(16, 4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=24, batch_first=True)
    ss.sparsify(model, 0.5)
    src, tgt = torch.randn(2, 7, 16), torch.randn(2, 4, 16)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(4)
    mem_pad = torch.zeros(2, 7, dtype=torch.bool)
    mem_pad[1, 5:] = True
    dep, y, ry = both(model, src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True, src_key_padding_mask=mem_pad,
                      memory_key_padding_mask=mem_pad)
    assert_close(y, ry)
    assert len(deployed_layers(dep)) == 4 + 2 * 6
