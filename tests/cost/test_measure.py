"""Tests of the cost model (METHOD.md §4). Every expected number is worked out by hand in a comment."""

from __future__ import annotations

import doctest
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import prunq.cost.measure as cost
from prunq.core.errors import PrunqError
from prunq.cost.measure import ENCODINGS, LayerQuant, measure
from prunq.prune.masks import attach_mask, set_mask
from tests.cost.test_encodings import HAND_ENTROPY, HAND_MASK  # the hand mask, its encodings worked out there

HAND_W = torch.tensor([[0.5, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, -0.25]])
Q_W4A8 = LayerQuant(weight_bits=4, act_bits=8, weight_scales=3, act_scales=1, scale_bits=32)


def hand_linear(bias: bool = True) -> nn.Sequential:
    """Sequential(Linear(4, 3)) whose effective weight is HAND_W, through a mask parametrization."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(HAND_W + 1.0)  # shadow weights all non-zero: only the mask makes zeros
    attach_mask(lin)
    set_mask(lin, HAND_MASK)
    with torch.no_grad():
        lin.parametrizations.weight.original.copy_(HAND_W)
    return nn.Sequential(lin)


# ---------------------------------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------------------------------


def test_hand_linear_layer_cost():
    c = measure(hand_linear(), (torch.ones(1, 4),), quant={"0": Q_W4A8})
    (lc,) = c.layers
    assert (lc.name, lc.kind, lc.shape) == ("0", "Linear", (3, 4))
    assert (lc.params, lc.nonzeros) == (12, 2)
    assert lc.density == pytest.approx(1 / 6)
    assert lc.macs == 12  # 3 outputs * 4 inputs
    assert (lc.weight_bits, lc.act_bits) == (4, 8)
    assert lc.bops == pytest.approx(64)  # 12 MACs * 1/6 * 4 * 8
    # relative with 4-bit values: r = 1..5 cost 7 + 5*4 = 27, 8 + 8 = 16, 9 + 4 = 13, 8, 10 -> r = 4
    assert lc.index_bits == {"dense": 0, "bitmap": 12, "csr": 12, "relative": 8}
    assert lc.relative_r == 4
    assert lc.entropy_bits == pytest.approx(HAND_ENTROPY)
    # values + index: dense 12 * 4 = 48, bitmap 2 * 4 + 12 = 20, csr 20, relative 8 + 8 = 16
    assert lc.encoding == "relative"
    assert lc.scale_bits == 32 * (3 + 1)  # 3 per-channel weight steps + 1 activation step
    assert lc.bias_bits == 32 * 3
    assert lc.memory_bits == 16 + 128 + 96  # 240
    assert [lc.memory_bits_as(e) for e in ENCODINGS] == [48 + 224, 20 + 224, 20 + 224, 240]


def test_hand_linear_model_totals_and_ratios():
    c = measure(hand_linear(), (torch.ones(1, 4),), quant={"0": Q_W4A8})
    assert (c.params, c.prunable_params, c.nonzeros) == (15, 12, 2)  # 12 weights + 3 biases
    assert (c.other_params, c.other_bits) == (0, 0)
    assert c.sparsity == pytest.approx(5 / 6)
    assert (c.macs, c.bops) == (12, pytest.approx(64))
    assert c.memory_bits == 240
    assert c.memory_bits_by_encoding == {"dense": 272, "bitmap": 244, "csr": 244, "relative": 240, "best": 240}
    assert c.dense_fp32_bops == 12 * 32 * 32  # 12288
    assert c.dense_fp32_memory_bits == 32 * 15  # 480
    assert c.dense_int8_bops == 12 * 8 * 8  # 768
    assert c.dense_int8_memory_bits == 8 * 12 + 32 * 3  # 192
    assert c.memory_ratio == pytest.approx(240 / 480)  # 0.5
    assert c.bops_ratio == pytest.approx(64 / 12288)  # 1/192
    assert c.memory_ratio_int8 == pytest.approx(240 / 192)  # 1.25: the 4-bit model's scales outweigh its savings
    assert c.bops_ratio_int8 == pytest.approx(64 / 768)  # 1/12


def test_power_of_two_scales_and_no_bias():
    q = LayerQuant(weight_bits=4, act_bits=8, weight_scales=3, act_scales=1, scale_bits=8)
    (lc,) = measure(hand_linear(bias=False), (torch.ones(1, 4),), quant={"0": q}).layers
    assert (lc.scale_bits, lc.bias_bits) == (8 * 4, 0)
    assert lc.memory_bits == 16 + 32


def test_unquantized_from_16_bits():
    # weight_bits 16 is costed as a 32-bit float and its steps are not stored; act 8 stays 8
    q = LayerQuant(weight_bits=16, act_bits=8, weight_scales=3, act_scales=1)
    (lc,) = measure(hand_linear(bias=False), (torch.ones(1, 4),), quant={"0": q}).layers
    assert (lc.weight_bits, lc.act_bits) == (32, 8)
    assert lc.scale_bits == 32  # the activation step only
    assert lc.bops == pytest.approx(12 / 6 * 32 * 8)  # 512
    # 32-bit values: relative r = 4 -> 2 * 32 + 8 = 72 beats bitmap / csr 64 + 12 = 76 and dense 384
    assert (lc.encoding, lc.memory_bits) == ("relative", 72 + 32)


def test_unquantized_defaults():
    (lc,) = measure(hand_linear(), (torch.ones(1, 4),)).layers
    assert (lc.weight_bits, lc.act_bits, lc.scale_bits) == (32, 32, 0)
    assert lc.bops == pytest.approx(12 / 6 * 1024)
    assert lc.memory_bits == 72 + 96


# ---------------------------------------------------------------------------------------------------
# Effective weights, canonical layout, encodings chosen
# ---------------------------------------------------------------------------------------------------


class _ZeroSmall(nn.Module):
    """A stand-in weight quantizer: rounds |w| < 0.3 to zero, and owns a learned step parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.step = nn.Parameter(torch.ones(3))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.where(w.abs() < 0.3, torch.zeros_like(w), w)


def test_counts_effective_weight_through_second_parametrization():
    m = hand_linear()
    parametrize.register_parametrization(m[0], "weight", _ZeroSmall())
    c = measure(m, (torch.ones(1, 4),))
    assert c.layers[0].nonzeros == 1  # the mask keeps 0.5 and -0.25; the quantizer rounds -0.25 to 0
    # the quantizer's step parameter lives inside the layer's weight: not counted as "other"
    assert (c.params, c.other_params) == (15, 0)


def test_conv_transpose_encodes_canonical_layout():
    layer = nn.ConvTranspose2d(2, 3, 1, bias=False)  # stored (in 2, out 3, 1, 1); canonical (3, 2, 1, 1)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[1, 0] = 1.0  # in 1 -> out 0: canonical flat position 1 (stored flat position 3)
    (lc,) = measure(nn.Sequential(layer), (torch.ones(1, 2, 1, 1),)).layers
    assert lc.shape == (3, 2, 1, 1)
    # canonical gap 1 fits r = 1 with no filler: 1 bit (the stored layout would need gap 3 -> a filler)
    assert (lc.index_bits["relative"], lc.relative_r) == (1, 1)
    # csr over 3 out-channel rows: 1 nz * ceil(log2 2) + 4 pointers * ceil(log2 2) = 1 + 4
    assert lc.index_bits["csr"] == 5


def test_encoding_is_the_minimum():
    dense = nn.Linear(4, 3, bias=False)  # all non-zero: dense 12 * 32 wins (every other adds index bits)
    half = nn.Linear(8, 8, bias=False)  # alternate 1, 0: every gap is 1
    far = nn.Linear(100_000, 1, bias=False)  # 2 nz at 0 and 99999: gap 99998 > 2^16 - 1
    empty = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        dense.weight.fill_(1.0)
        half.weight.copy_((torch.arange(64) % 2 == 0).float().reshape(8, 8))
        far.weight.zero_()
        far.weight[0, 0] = far.weight[0, 99_999] = 1.0
        empty.weight.zero_()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense, self.half, self.far, self.empty = dense, half, far, empty

        def forward(self, x):
            return x

    c = measure(Net(), (torch.ones(1),))
    by = {lc.name: lc for lc in c.layers}
    assert by["dense"].encoding == "dense"
    # half: 32 nz; bitmap 64; csr 32 * 3 + 9 * 6 = 150; relative r = 1 (all gaps 1): 32 bits
    assert by["half"].index_bits == {"dense": 0, "bitmap": 64, "csr": 150, "relative": 32}
    assert by["half"].encoding == "relative"
    # far: relative r = 16 needs floor(99998 / 65536) = 1 filler: 3 * 16 + 32 = 80;
    # csr: 2 * ceil(log2 100000) = 34 + 2 pointers * 2 = 38 -> csr wins
    assert by["far"].index_bits["relative"] == 80
    assert by["far"].index_bits["csr"] == 38
    assert by["far"].encoding == "csr"
    # empty: relative stores nothing
    assert (by["empty"].encoding, by["empty"].memory_bits) == ("relative", 0)
    for lc in c.layers:
        assert lc.memory_bits == min(lc.memory_bits_as(e) for e in ENCODINGS)
    assert c.memory_bits_by_encoding["best"] == c.memory_bits == sum(lc.memory_bits for lc in c.layers)
    assert all(c.memory_bits <= c.memory_bits_by_encoding[e] for e in ENCODINGS)
    assert c.macs == 0 and c.bops == 0 and c.bops_ratio == 0.0  # nothing called in forward


def test_bitmap_wins_at_half_density_with_scattered_zeros():
    torch.manual_seed(1)
    layer = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        layer.weight.mul_((torch.rand(16, 64) < 0.5).float())
    (lc,) = measure(nn.Sequential(layer), (torch.ones(1, 64),)).layers
    assert lc.encoding == "bitmap"
    assert lc.memory_bits == lc.nonzeros * 32 + 1024


# ---------------------------------------------------------------------------------------------------
# References, other parameters, JSON, errors
# ---------------------------------------------------------------------------------------------------


def test_reference_ratios_after_bn_folding():
    ref_model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ref = measure(ref_model, (torch.ones(1, 4),))
    # 12 weights + 3 biases + BN weight 3 + BN bias 3 = 21 params; BN's 6 are "other"
    assert (ref.params, ref.prunable_params, ref.other_params, ref.other_bits) == (21, 12, 6, 192)
    assert ref.dense_fp32_memory_bits == 32 * 21  # 672
    assert ref.dense_int8_memory_bits == 8 * 12 + 32 * 9  # 384
    assert ref.memory_bits == 672 and ref.memory_ratio == 1.0 and ref.bops_ratio == 1.0
    assert ref.memory_ratio_int8 == pytest.approx(672 / 384)  # 1.75
    # the compressed model has BN folded away: 15 params, ratios against the reference's 21
    c = measure(hand_linear(), (torch.ones(1, 4),), quant={"0": Q_W4A8}, reference=ref)
    assert c.params == 15
    assert (c.dense_fp32_memory_bits, c.dense_int8_memory_bits) == (672, 384)
    assert (c.dense_fp32_bops, c.dense_int8_bops) == (12288, 768)
    assert c.memory_ratio == pytest.approx(240 / 672)  # 5/14
    assert c.memory_ratio_int8 == pytest.approx(240 / 384)  # 0.625
    assert c.bops_ratio == pytest.approx(64 / 12288)
    assert c.bops_ratio_int8 == pytest.approx(64 / 768)


def test_int8_model_against_int8_reference_is_not_a_pruning_gain():
    m = nn.Sequential(nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        m[0].weight.fill_(1.0)
    c = measure(m, (torch.ones(1, 4),), quant={"0": LayerQuant(weight_bits=8, act_bits=8)})
    # dense 8-bit values, no scales: 96 bits, 768 BOPs -> exactly the int8 reference, a quarter of fp32
    assert (c.memory_ratio, c.bops_ratio) == (0.25, pytest.approx(1 / 16))
    assert (c.memory_ratio_int8, c.bops_ratio_int8) == (1.0, 1.0)


def test_excluded_layer_is_other_and_precomputed_macs():
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    c = measure(m, None, exclude=("1",), macs={"0": 12})
    assert [lc.name for lc in c.layers] == ["0"]
    assert (c.prunable_params, c.other_params, c.params) == (12, 8, 23)
    assert c.memory_bits == 32 * 23


def test_to_dict_is_json_safe():
    c = measure(hand_linear(), (torch.ones(1, 4),), quant={"0": Q_W4A8})
    d = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert d["memory_bits"] == 240 and d["memory_bits_by_encoding"]["best"] == 240
    assert d["layers"][0]["shape"] == [3, 4] and d["layers"][0]["encoding"] == "relative"
    assert d["layers"][0]["index_bits"]["csr"] == 12
    assert c.layer("0").memory_bits == 240


def test_errors():
    with pytest.raises(PrunqError, match="no compressible layer"):
        measure(nn.Sequential(nn.ReLU()), (torch.ones(1, 4),))
    with pytest.raises(PrunqError, match="not measured layers"):
        measure(hand_linear(), (torch.ones(1, 4),), quant={"fc": Q_W4A8})
    with pytest.raises(PrunqError, match="no MAC count"):
        measure(hand_linear(), None, macs={})
    with pytest.raises(PrunqError, match="weight_bits"):
        LayerQuant(weight_bits=0)
    with pytest.raises(PrunqError, match="act_scales"):
        LayerQuant(act_scales=-1)


def test_docstring_examples():
    result = doctest.testmod(cost, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_dead_input_channels_cost_no_bops():
    """METHOD.md §4: an input channel whose producing filter is pruned (no bias) contributes no MACs."""
    m = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.Conv2d(2, 3, 1, bias=False))
    with torch.no_grad():
        m[0].weight[1] = 0.0  # filter 1 pruned: conv 2's input channel 1 is dead
    x = (torch.zeros(1, 1, 5, 5),)
    c2 = cost.measure(m, x).layer("2")
    assert c2.dead_inputs == 1 and c2.live_nonzeros == 3 and c2.nonzeros == 6
    assert c2.macs == 9 * 6 and c2.bops == 9 * 6 * 3 / 6 * 32 * 32  # half the weights do work
    assert cost.measure(m, x, dead_channels=False).layer("2").bops == 9 * 6 * 32 * 32
    with torch.no_grad():
        m[0].weight[1, 0, 0, 0] = 1.0  # alive again
    assert cost.measure(m, x).layer("2").dead_inputs == 0


def test_a_pruned_filter_with_a_bias_is_not_dead():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 1, bias=False))
    with torch.no_grad():
        m[0].weight[1] = 0.0
        m[0].bias.fill_(0.5)  # a constant, not zero
    assert cost.measure(m, (torch.zeros(1, 1, 5, 5),)).layer("2").dead_inputs == 0


# ---------------------------------------------------------------------------------------------------
# Weight BOPs + activation BOPs (METHOD.md §4)
# ---------------------------------------------------------------------------------------------------


class _QK(nn.Module):
    """``Linear(4, 4)`` gives q; ``q * x`` multiplies two activations: 4 products per example."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) * x


def test_no_activation_products_leaves_bops_as_before():
    c = measure(hand_linear(), (torch.ones(1, 4),), quant={"0": Q_W4A8})
    assert c.act_sites == [] and c.act_bops == 0.0 and c.act_macs == 0
    assert c.bops == c.weight_bops == pytest.approx(64)  # 12 MACs * 1/6 * 4 * 8, as before
    assert c.dense_fp32_bops == 12 * 32 * 32 and c.dense_int8_bops == 12 * 8 * 8
    d = c.to_dict()
    assert (d["weight_bops"], d["act_bops"], d["act_macs"], d["act_sites"]) == (64.0, 0.0, 0, [])


def test_bops_are_weight_plus_activation_bops():
    m = _QK()
    c = measure(m, (torch.randn(3, 4),), quant={"q": LayerQuant(weight_bits=4, act_bits=8)})
    (s,) = c.act_sites
    # weight: 16 MACs * 4 * 8 = 512; activation: q(x) * x, 4 products at 32 x 32 (neither is quantized)
    assert (s.kind, s.bits, s.macs) == ("act*act", (32, 32), 4)
    assert c.weight_bops == pytest.approx(16 * 4 * 8) and c.act_bops == 4 * 32 * 32 and c.act_macs == 4
    assert c.bops == pytest.approx(c.weight_bops + c.act_bops) == 512 + 4096
    # the dense references count the activation products too: (16 + 4) MACs
    assert c.dense_fp32_bops == 20 * 32 * 32 and c.dense_int8_bops == 20 * 8 * 8
    assert c.bops_ratio == pytest.approx((512 + 4096) / (20 * 1024))
    d = c.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["bops"] == d["weight_bops"] + d["act_bops"]
    assert d["act_sites"] == [
        {"name": "<model>:mul", "module": "", "op": "mul", "kind": "act*act", "bits": [32, 32], "calls": 1,
         "dense_macs": 4, "macs": 4, "bops": 4096.0, "where": s.where}
    ]  # fmt: skip
    # precomputed or switched off
    assert measure(m, (torch.randn(3, 4),), act_sites=[]).act_bops == 0
    assert measure(m, (torch.randn(3, 4),), act_sites=c.act_sites).act_bops == c.act_bops
    assert measure(m, None, macs={"q": 16}).act_sites == []


def test_reference_ratio_includes_activation_products():
    m = _QK()
    x = (torch.randn(1, 4),)
    dense = measure(m, x)
    assert dense.bops == dense.dense_fp32_bops == (16 + 4) * 1024 and dense.bops_ratio == 1.0
    attach_mask(m.q)
    set_mask(m.q, torch.tensor([[1.0, 0, 0, 0]] * 4))  # 3/4 pruned
    c = measure(m, x, reference=dense)
    assert c.weight_bops == 4 * 1024 and c.act_bops == 4 * 1024
    assert c.bops_ratio == pytest.approx(8 / 20)


def test_dead_channels_leave_activation_products_out():
    m = _QK()
    attach_mask(m.q)
    set_mask(m.q, torch.tensor([[1.0] * 4, [0.0] * 4, [1.0] * 4, [0.0] * 4]))  # outputs 1 and 3 pruned, no bias
    c = measure(m, (torch.randn(2, 4),))
    (s,) = c.act_sites
    assert (s.dense_macs, s.macs) == (4, 2) and c.act_bops == 2 * 1024
    assert c.dense_fp32_bops == (16 + 4) * 1024  # the dense reference counts every product
    assert measure(m, (torch.randn(2, 4),), dead_channels=False).act_macs == 4


def test_stereo_net_weight_and_activation_bops():
    """StereoNet at the stereo task's small example size (64 x 128, max_disp 32): the correlation volume
    and soft-argmin are activation products. C=32 features at 16 x 32 over 8 disparities:
    32 * 16 * (32 + 31 + ... + 25) = 116736 products; soft-argmin 8 * 16 * 32 = 4096, 3584 without d = 0."""
    from prunq.tasks.stereo.models import StereoNet

    torch.manual_seed(0)
    m = StereoNet(max_disp=32)
    x = (torch.rand(1, 3, 64, 128), torch.rand(1, 3, 64, 128))
    c = measure(m, x)
    sites = {s.name: s for s in c.act_sites}
    assert set(sites) == {"group_correlation:mul", "_soft_argmin:mul"}
    corr, soft = sites["group_correlation:mul"], sites["_soft_argmin:mul"]
    assert (corr.kind, corr.calls, corr.macs, corr.bits) == ("act*act", 8, 116736, (32, 32))
    assert (soft.kind, soft.dense_macs, soft.macs) == ("act*const", 4096, 3584)
    assert c.weight_bops > 0 and c.act_bops > 0
    assert c.bops == pytest.approx(c.weight_bops + c.act_bops)
    assert c.dense_fp32_bops == (c.macs + 116736 + 4096) * 32 * 32
