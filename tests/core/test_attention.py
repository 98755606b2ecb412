"""DecomposedAttention is nn.MultiheadAttention with its projections as Linear children: same function,
same gradients, and every projection visible to prunq (masks, quantizers, hooks, MAC counting)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunq.core.attention import DecomposedAttention, decompose_attention_
from prunq.core.errors import PrunqError
from prunq.core.layers import compressible_layers
from prunq.cost.macs import count_macs

TOL = 1e-6
PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _mha(batch_first: bool, bias: bool = True, kdim: int | None = None, vdim: int | None = None, **kw) -> nn.Module:
    mha = nn.MultiheadAttention(8, 2, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first, **kw)
    if bias:  # MHA zero-initialises its biases: make them count
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha


def _inputs(batch_first: bool, n: int, tgt: int, src: int, kdim: int, vdim: int):
    def make(length: int, dim: int) -> torch.Tensor:
        return torch.randn(n, length, dim) if batch_first else torch.randn(length, n, dim)

    return make(tgt, 8), make(src, kdim), make(src, vdim)


def _masks(n: int, tgt: int, src: int, heads: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    attn = torch.rand(tgt, src) > 0.7
    attn[:, 0] = False  # every query keeps one key: no all -inf rows
    kpm = torch.rand(n, src) > 0.7
    kpm[:, 0] = False
    return {
        "none": {},
        "attn_bool": {"attn_mask": attn},
        "attn_float": {"attn_mask": torch.randn(tgt, src)},
        "attn_3d": {"attn_mask": torch.randn(n * heads, tgt, src)},
        "key_padding": {"key_padding_mask": kpm},
        "both": {"attn_mask": attn, "key_padding_mask": kpm},
    }


# ---------------------------------------------------------------------------------------------------
# Same function as nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch_first,bias,dims,train",
    list(itertools.product([True, False], [True, False], [(None, None), (6, 5)], [False, True])),
)
def test_same_outputs_as_mha(batch_first, bias, dims, train):
    kdim, vdim = dims
    mha = _mha(batch_first, bias, kdim, vdim)  # dropout 0: train and eval are deterministic
    att = DecomposedAttention.from_mha(mha)
    mha.train(train)
    att.train(train)
    n, tgt, src = 3, 5, 4
    q, k, v = _inputs(batch_first, n, tgt, src, kdim or 8, vdim or 8)
    for name, masks in _masks(n, tgt, src).items():
        for need_weights, average in [(False, True), (True, True), (True, False)]:
            a_out, a_w = mha(q, k, v, need_weights=need_weights, average_attn_weights=average, **masks)
            b_out, b_w = att(q, k, v, need_weights=need_weights, average_attn_weights=average, **masks)
            assert _max_diff(a_out, b_out) <= TOL, (name, need_weights)
            if need_weights:
                assert _max_diff(a_w, b_w) <= TOL, (name, average)
            else:
                assert b_w is None


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("padding", [False, True])
def test_is_causal(batch_first, need_weights, padding):
    mha = _mha(batch_first)
    att = DecomposedAttention.from_mha(mha)
    x = torch.randn(3, 6, 8) if batch_first else torch.randn(6, 3, 8)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    kpm = torch.zeros(3, 6, dtype=torch.bool) if not padding else torch.arange(6).expand(3, 6) > 4
    kw = {"attn_mask": causal, "is_causal": True, "need_weights": need_weights, "key_padding_mask": kpm}
    assert _max_diff(mha(x, x, x, **kw)[0], att(x, x, x, **kw)[0]) <= TOL
    with pytest.raises(RuntimeError, match="is_causal"):
        att(x, x, x, is_causal=True)  # as MHA: the hint needs the mask


@pytest.mark.parametrize("need_weights", [True, False])
def test_unbatched_inputs(need_weights):
    mha = _mha(batch_first=True)
    att = DecomposedAttention.from_mha(mha)
    x, mem = torch.randn(5, 8), torch.randn(4, 8)
    kpm = torch.tensor([False, False, True, False])
    for kw in ({}, {"key_padding_mask": kpm}, {"attn_mask": torch.randn(2, 5, 4)}):
        a, aw = mha(x, mem, mem, need_weights=need_weights, **kw)
        b, bw = att(x, mem, mem, need_weights=need_weights, **kw)
        assert b.shape == (5, 8) and _max_diff(a, b) <= TOL
        if need_weights:
            assert _max_diff(aw, bw) <= TOL


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_in_training_as_mha(need_weights):
    """Same dropout on the attention weights, drawing the same random numbers."""
    mha = _mha(batch_first=True, dropout=0.5).train()
    att = DecomposedAttention.from_mha(mha)
    assert att.training and att.dropout == 0.5
    x = torch.randn(3, 5, 8)
    torch.manual_seed(1)
    a = mha(x, x, x, need_weights=need_weights)[0]
    torch.manual_seed(1)
    b = att(x, x, x, need_weights=need_weights)[0]
    assert _max_diff(a, b) <= TOL
    assert _max_diff(b, att.eval()(x, x, x)[0]) > 1e-3  # dropout did act in training


def test_gradients_reach_every_projection_and_match_mha():
    mha = _mha(batch_first=False)
    att = DecomposedAttention.from_mha(mha)
    x, mem = torch.randn(5, 3, 8), torch.randn(4, 3, 8)
    target = torch.randn(5, 3, 8)
    for m in (mha, att):
        ((m(x, mem, mem, need_weights=False)[0] - target) ** 2).sum().backward()
    gw, gb = mha.in_proj_weight.grad.chunk(3), mha.in_proj_bias.grad.chunk(3)
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        lin = getattr(att, proj)
        assert lin.weight.grad.abs().sum() > 0 and lin.bias.grad.abs().sum() > 0
        torch.testing.assert_close(lin.weight.grad, gw[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lin.bias.grad, gb[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(att.out_proj.weight.grad, mha.out_proj.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(att.out_proj.bias.grad, mha.out_proj.bias.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Inside torch's own TransformerEncoder
# ---------------------------------------------------------------------------------------------------


def _encoder(batch_first: bool) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=batch_first)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder(batch_first, train):
    ref = _encoder(batch_first)
    enc = copy.deepcopy(ref)
    assert decompose_attention_(enc) == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(isinstance(layer.self_attn, DecomposedAttention) for layer in enc.layers)
    assert not enc.use_nested_tensor
    ref.train(train)
    enc.train(train)
    x = torch.randn(3, 6, 16) if batch_first else torch.randn(6, 3, 16)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    cases = [{}, {"src_key_padding_mask": kpm}, {"mask": causal, "is_causal": True}]
    for kw in [*cases, {"mask": causal, "src_key_padding_mask": kpm}]:
        # grad enabled: the reference takes torch's ordinary path too, so the two must agree to float rounding
        assert _max_diff(ref(x, **kw), enc(x, **kw)) <= TOL, kw


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the fused reference nests
def test_decomposed_encoder_never_takes_the_fused_paths(monkeypatch):
    """In eval under no_grad torch would fuse the layer (and nest padded batches), calling neither
    ``self_attn`` nor ``out_proj``; with the decomposed attention it must take the ordinary path."""
    ref = _encoder(batch_first=True).eval()
    enc = copy.deepcopy(ref)
    decompose_attention_(enc)
    with pytest.warns(UserWarning, match="use_nested_tensor is False"):  # built after decomposing: no nesting
        built = nn.TransformerEncoder(copy.deepcopy(enc.layers[0]), 2)
    built.load_state_dict(enc.state_dict())
    x = torch.randn(3, 6, 16)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=kpm)  # the fused, nested reference (padded back to a tensor)

    def refuse(*args, **kwargs):
        raise AssertionError("fused path taken")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", refuse)
    monkeypatch.setattr(torch, "_nested_tensor_from_mask", refuse)
    with torch.no_grad():
        for model in (enc, built):
            got = model(x, src_key_padding_mask=kpm)
            keep = ~kpm  # the nested reference writes 0 at padded positions
            assert _max_diff(got[keep], expected[keep]) <= 1e-5  # a different (fused) kernel: float rounding
            assert _max_diff(got, enc(x)) > 0  # the padding mask did act


def test_transformer_decoder_and_full_transformer():
    ref = nn.Transformer(16, 4, 1, 1, 32, dropout=0.0, batch_first=True)
    model = copy.deepcopy(ref)
    names = decompose_attention_(model)
    assert names == [
        "encoder.layers.0.self_attn",
        "decoder.layers.0.self_attn",
        "decoder.layers.0.multihead_attn",
    ]
    src, tgt = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    kw = {"tgt_mask": mask, "tgt_is_causal": True}
    assert _max_diff(ref(src, tgt, **kw), model(src, tgt, **kw)) <= TOL


@pytest.mark.parametrize("batch_first", [True, False])
def test_count_macs_counts_the_four_projections(batch_first):
    enc = _encoder(batch_first)
    decompose_attention_(enc)
    t, b, d = 6, 3, 16
    x = torch.randn(b, t, d) if batch_first else torch.randn(t, b, d)
    macs = count_macs(enc, (x,), batch_size=b)
    enc.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        enc(x)
    flops = fc.get_flop_counts()
    for i in range(2):
        for proj in PROJ:
            name = f"layers.{i}.self_attn.{proj}"
            ops = {str(op).rsplit(".", 1)[-1]: v for op, v in flops[f"TransformerEncoder.{name}"].items()}
            weight_flops = sum(v for op, v in ops.items() if op in ("mm", "addmm", "linear"))
            assert macs[name] == weight_flops // (2 * b) == t * d * d


# ---------------------------------------------------------------------------------------------------
# Construction, copies, state dicts
# ---------------------------------------------------------------------------------------------------


def test_projections_are_compressible_linears():
    att = DecomposedAttention(8, 2, kdim=6, vdim=5)
    assert [n for n, _ in compressible_layers(att)] == list(PROJ)
    assert att.k_proj.weight.shape == (8, 6) and att.v_proj.weight.shape == (8, 5)
    assert att.in_proj_weight is None and att.in_proj_bias is None and not att._qkv_same_embed_dim
    no_bias = DecomposedAttention(8, 2, bias=False)
    assert all(getattr(no_bias, p).bias is None for p in PROJ)


def test_deepcopy_state_dict_round_trip_and_like():
    mha = _mha(batch_first=True, kdim=6, vdim=5)
    att = DecomposedAttention.from_mha(mha)
    q, k, v = _inputs(True, 2, 4, 3, 6, 5)
    expected = att(q, k, v)[0]
    assert _max_diff(copy.deepcopy(att)(q, k, v)[0], expected) == 0
    for src in (mha, att, {"embed_dim": 8, "num_heads": 2, "kdim": 6, "vdim": 5, "batch_first": True}):
        fresh = DecomposedAttention.like(src)
        assert _max_diff(fresh(q, k, v)[0], expected) > 0  # fresh weights
        fresh.load_state_dict(att.state_dict())
        assert _max_diff(fresh(q, k, v)[0], expected) == 0
    assert sorted(att.state_dict()) == sorted(f"{p}.{t}" for p in PROJ for t in ("weight", "bias"))
    with pytest.raises(PrunqError, match="unknown"):
        DecomposedAttention.like({"embed_dim": 8, "num_heads": 2, "heads": 3})


def test_to_mha_round_trip():
    mha = _mha(batch_first=False)
    att = DecomposedAttention.from_mha(mha)
    back = att.to_mha()
    x = torch.randn(4, 2, 8)
    assert _max_diff(back(x, x, x)[0], mha(x, x, x)[0]) <= TOL
    assert torch.equal(back.in_proj_weight, mha.in_proj_weight)


def test_from_mha_copies_flags_and_mode():
    mha = _mha(batch_first=True).eval()
    mha.in_proj_weight.requires_grad_(False)
    att = DecomposedAttention.from_mha(mha)
    assert not att.training
    assert not att.q_proj.weight.requires_grad and att.q_proj.bias.requires_grad and att.out_proj.weight.requires_grad


def test_refusals():
    with pytest.raises(PrunqError, match="add_bias_kv"):
        DecomposedAttention(8, 2, add_bias_kv=True)
    with pytest.raises(PrunqError, match="add_zero_attn"):
        DecomposedAttention.from_mha(nn.MultiheadAttention(8, 2, add_zero_attn=True))
    with pytest.raises(PrunqError, match="num_heads"):
        DecomposedAttention(8, 3)
    with pytest.raises(PrunqError, match="from_mha"):
        decompose_attention_(nn.MultiheadAttention(8, 2))
    with pytest.raises(PrunqError, match="nested"):
        att = DecomposedAttention(8, 2, batch_first=True)
        x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(2, 8)])
        att(x, x, x)
    mha = nn.MultiheadAttention(8, 2)
    from prunq.prune.masks import attach_mask

    attach_mask(mha.out_proj)
    with pytest.raises(PrunqError, match="parametrizations"):
        DecomposedAttention.from_mha(mha)


def test_decompose_keeps_shared_modules_shared():
    shared = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict({"a": nn.ModuleDict({"attn": shared}), "b": nn.ModuleDict({"attn": shared})})
    assert decompose_attention_(model) == ["a.attn", "b.attn"]
    assert model["a"]["attn"] is model["b"]["attn"]
    assert isinstance(model["a"]["attn"], DecomposedAttention)
    assert decompose_attention_(model) == []


# ---------------------------------------------------------------------------------------------------
# prunq sees the projections: masks, quantizers, calibration
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
def test_prune_and_quantize_projections(batch_first):
    from prunq.prune.masks import attach_mask, set_mask
    from prunq.quant.prepare import QuantConfig, calibrate, prepare

    enc = _encoder(batch_first)
    decompose_attention_(enc)
    names = [n for n, _ in compressible_layers(enc)]
    assert {f"layers.{i}.self_attn.{p}" for i in range(2) for p in PROJ} <= set(names)
    attn = enc.layers[0].self_attn
    for proj in PROJ:
        lin = getattr(attn, proj)
        attach_mask(lin)
        set_mask(lin, torch.rand_like(lin.weight) > 0.5)
    prepare(enc, QuantConfig(weight_bits=4, act_bits=8))
    x = torch.randn(3, 6, 16) if batch_first else torch.randn(6, 3, 16)
    calibrate(enc, [x])  # the out_proj's input quantizer is fed: it used to see no input
    for proj in PROJ:
        lin = getattr(attn, proj)
        mask = lin.parametrizations.weight[0].mask
        assert torch.all(lin.weight[mask == 0] == 0)
    assert torch.isfinite(enc(x)).all()
