"""Tests of the cost model (METHOD.md §4). Every expected number is worked out by hand in a comment."""

from __future__ import annotations

import doctest
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import prunq.cost.measure as cost
from prunq.cost.measure import (
    ENCODINGS,
    LayerQuant,
    best_relative,
    count_macs,
    entropy_bound_bits,
    index_bits,
    measure,
    relative_bits,
)
from prunq.core.errors import PrunqError
from prunq.prune.masks import attach_mask, set_mask

# The hand-made mask of a Linear(4, 3): weight (3, 4), N = 12, nz = 2 at flat positions 0 and 11.
#   row 0: 1 0 0 0
#   row 1: 0 0 0 0
#   row 2: 0 0 0 1
HAND_MASK = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
HAND_W = torch.tensor([[0.5, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, -0.25]])
# 12 * H(1/6) = 12 * (1/6 * log2 6 + 5/6 * log2 1.2) = 12 * (0.430827 + 0.219195) = 7.80026...
HAND_ENTROPY = 12 * ((1 / 6) * math.log2(6) + (5 / 6) * math.log2(6 / 5))
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
# Encodings on the hand mask
# ---------------------------------------------------------------------------------------------------


def test_hand_mask_index_bits_each_encoding():
    assert index_bits(HAND_MASK, "dense") == 0
    assert index_bits(HAND_MASK, "bitmap") == 12  # one bit per position
    # csr: rows 3, cols 4 -> nz * ceil(log2 4) = 2 * 2 = 4; (3 + 1) row pointers * ceil(log2(2 + 1)) = 4 * 2 = 8
    assert index_bits(HAND_MASK, "csr") == 12
    # relative, gaps (0, 10): r = 4 holds 10 <= 15 without fillers -> 2 entries * 4 bits
    assert index_bits(HAND_MASK, "relative", r=4) == 8
    assert index_bits(HAND_MASK, "relative") == 8  # best r is 4 (see below)


def test_relative_needs_fillers():
    flat = HAND_MASK.reshape(-1)
    # r = 1 (M = 1): gap 10 -> floor(10 / 2) = 5 fillers; 7 entries * 1 bit + 5 filler values * 32 = 167
    assert relative_bits(flat, 1) == (167, 5)
    # r = 2 (M = 3): floor(10 / 4) = 2 fillers; 4 entries * 2 + 2 * 32 = 72
    assert relative_bits(flat, 2) == (72, 2)
    # r = 3 (M = 7): floor(10 / 8) = 1 filler (at gap 7, leaving gap 2); 3 * 3 + 32 = 41
    assert relative_bits(flat, 3) == (41, 1)
    # with 4-bit values the filler costs 4: 3 * 3 + 4 = 13
    assert relative_bits(flat, 3, value_bits=4) == (13, 1)
    assert relative_bits(flat, 4) == (8, 0)
    assert relative_bits(flat, 5) == (10, 0)  # 2 entries * 5 bits
    # trailing zeros cost nothing: appending 100 zeros changes nothing
    assert relative_bits(torch.cat([flat, torch.zeros(100, dtype=torch.bool)]), 2) == (72, 2)


def test_relative_filler_at_exact_multiple():
    # gap exactly 8 with r = 3: one filler at gap 7, then the non-zero at gap 0 -> 1 filler, 2 entries
    m = torch.tensor([0] * 8 + [1], dtype=torch.bool)
    assert relative_bits(m, 3, value_bits=0) == (2 * 3, 1)
    # gap 16: floor(16 / 8) = 2 fillers
    m = torch.tensor([0] * 16 + [1], dtype=torch.bool)
    assert relative_bits(m, 3, value_bits=0) == (3 * 3, 2)


def test_best_relative_picks_cheapest_r():
    # 32-bit values: r = 1..5 cost 167, 72, 41, 8, 10 -> r = 4
    assert best_relative(HAND_MASK) == (8, 4)
    # 0-bit values make fillers cheap: r = 1 -> 7, r = 2 -> 8, r = 3 -> 9, r = 4 -> 8 -> r = 1
    assert best_relative(HAND_MASK, value_bits=0) == (7, 1)
    # all zeros: nothing stored for any r; ties go to the smallest r
    assert best_relative(torch.zeros(3, 4, dtype=torch.bool)) == (0, 1)


def test_csr_fields_at_least_one_bit():
    # one column: ceil(log2 1) = 0 -> 1 bit per column index; rows 3: 2 nz * 1 + 4 pointers * ceil(log2 3) = 2 + 8
    m = torch.tensor([[1], [0], [1]], dtype=torch.bool)
    assert index_bits(m, "csr") == 10
    # no non-zero: ceil(log2 1) = 0 -> 1 bit per pointer, 4 pointers
    assert index_bits(torch.zeros(3, 4, dtype=torch.bool), "csr") == 4


def test_entropy_bound():
    assert entropy_bound_bits(12, 2) == pytest.approx(HAND_ENTROPY)
    assert HAND_ENTROPY == pytest.approx(7.80026, abs=1e-5)
    assert entropy_bound_bits(8, 4) == 8.0  # H(1/2) = 1
    assert entropy_bound_bits(12, 0) == 0.0
    assert entropy_bound_bits(12, 12) == 0.0
    with pytest.raises(ValueError):
        entropy_bound_bits(3, 4)


def test_unknown_encoding_and_bad_r():
    with pytest.raises(PrunqError):
        index_bits(HAND_MASK, "huffman")
    with pytest.raises(ValueError):
        relative_bits(HAND_MASK, 0)


# ---------------------------------------------------------------------------------------------------
# Property: the vectorised relative count equals a literal walk over the mask
# ---------------------------------------------------------------------------------------------------


def slow_relative(mask: list[bool], r: int, value_bits: int) -> tuple[int, int]:
    """Deep Compression, literally: walk the positions; a zero reached after M = 2^r - 1 unstored zeros
    is stored as a filler (gap M). Stop at the last non-zero (trailing zeros are never stored)."""
    last = max((i for i, b in enumerate(mask) if b), default=-1)
    m = 2**r - 1
    entries = fillers = run = 0
    for b in mask[: last + 1]:
        if b:
            assert run <= m
            entries += 1
            run = 0
        elif run == m:
            entries += 1
            fillers += 1
            run = 0
        else:
            run += 1
    return entries * r + fillers * value_bits, fillers


@st.composite
def masks(draw) -> list[bool]:
    # gaps up to 70 so that small r need fillers, some runs of adjacent non-zeros, trailing zeros
    gaps = draw(st.lists(st.one_of(st.integers(0, 3), st.integers(0, 70)), max_size=40))
    out: list[bool] = []
    for g in gaps:
        out += [False] * g + [True]
    return out + [False] * draw(st.integers(0, 20))


@settings(max_examples=200, deadline=None)
@given(mask=masks(), r=st.integers(1, 8), value_bits=st.sampled_from([0, 2, 4, 8, 32]))
def test_relative_bits_matches_slow_walk(mask, r, value_bits):
    t = torch.tensor(mask, dtype=torch.bool)
    assert relative_bits(t, r, value_bits) == slow_relative(mask, r, value_bits)


@settings(max_examples=100, deadline=None)
@given(mask=masks(), value_bits=st.sampled_from([0, 4, 32]))
def test_best_relative_is_brute_force_minimum(mask, value_bits):
    t = torch.tensor(mask, dtype=torch.bool)
    costs = [(slow_relative(mask, r, value_bits)[0], r) for r in range(1, 17)]
    assert best_relative(t, value_bits) == min(costs)  # min of (bits, r): ties to the smallest r


# ---------------------------------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------------------------------


def test_conv2d_macs_on_5x5():
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 3, stride=2, padding=1))
    macs = count_macs(m, (torch.zeros(1, 2, 5, 5),))
    # conv 0: output 3 x 3 x 3 = 27 elements, each 2 * 3 * 3 = 18 weights -> 486
    # conv 1 on 3 x 3: stride 2, pad 1 -> 2 x 2 output, 4 channels = 16 elements * 3 * 9 = 27 -> 432
    assert macs == {"0": 486, "1": 432}


def test_conv_transpose_and_grouped_macs():
    m = nn.ModuleDict(
        {
            "t": nn.ConvTranspose2d(2, 3, 3),  # each of 2 * 25 = 50 inputs hits 3 * 9 weights -> 1350
            "g": nn.Conv2d(4, 6, 3, groups=2, padding=1),  # 6 * 25 = 150 outputs * (2 * 9) -> 2700
            "gt": nn.ConvTranspose2d(4, 6, 3, groups=2),  # 100 inputs * (6 / 2) * 9 -> 2700
        }
    )

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = m

        def forward(self, x2, x4):
            return self.m["t"](x2), self.m["g"](x4), self.m["gt"](x4)

    net = Net()
    inputs = (torch.zeros(1, 2, 5, 5), torch.zeros(1, 4, 5, 5))
    assert count_macs(net, inputs) == {"m.t": 1350, "m.g": 2700, "m.gt": 2700}
    c = measure(net, inputs)
    # canonical shapes: (out, in_per_group, k, k)
    assert [lc.shape for lc in c.layers] == [(3, 2, 3, 3), (6, 2, 3, 3), (6, 2, 3, 3)]
    assert c.macs == 1350 + 2700 + 2700


def test_count_macs_sums_repeated_calls_excludes_and_restores_modes():
    class Siamese(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feat = nn.Linear(4, 3)  # called twice: 2 * 12 = 24
            self.bn = nn.BatchNorm1d(3)  # batch of 1 in train mode would raise: must run in eval
            self.head = nn.Linear(3, 2)  # 6
            self.unused = nn.Linear(5, 5)  # never called: 0
            self.drop = nn.Dropout()

        def forward(self, a, b):
            return self.head(self.drop(self.bn(self.feat(a) + self.feat(b))))

    net = Siamese()
    net.train()
    net.head.eval()  # mixed modes are restored module by module
    x = (torch.ones(1, 4), torch.ones(1, 4))
    assert count_macs(net, x) == {"feat": 24, "head": 6, "unused": 0}
    assert count_macs(net, x, exclude=("he*",)) == {"feat": 24, "unused": 0}
    assert net.training and net.bn.training and net.feat.training and not net.head.training
    assert not any(m._forward_hooks for m in net.modules())


def test_macs_divided_by_batch():
    m = nn.Sequential(nn.Conv2d(2, 3, 3))
    assert count_macs(m, (torch.zeros(4, 2, 5, 5),)) == {"0": 486}


# ---------------------------------------------------------------------------------------------------
# One layer, measured
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
