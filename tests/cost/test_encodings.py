"""Sparse position encodings and the entropy bound (prunq.cost.encodings, METHOD.md §4). Every expected
number is worked out by hand in a comment."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prunq.cost.encodings as encodings
from prunq.core.errors import PrunqError
from prunq.cost.encodings import best_relative, entropy_bound_bits, index_bits, relative_bits

# The hand-made mask of a Linear(4, 3): weight (3, 4), N = 12, nz = 2 at flat positions 0 and 11.
#   row 0: 1 0 0 0
#   row 1: 0 0 0 0
#   row 2: 0 0 0 1
HAND_MASK = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
# 12 * H(1/6) = 12 * (1/6 * log2 6 + 5/6 * log2 1.2) = 12 * (0.430827 + 0.219195) = 7.80026...
HAND_ENTROPY = 12 * ((1 / 6) * math.log2(6) + (5 / 6) * math.log2(6 / 5))


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


def test_docstring_examples():
    result = doctest.testmod(encodings, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_non_boolean_masks_and_one_dimensional_csr():
    # any non-zero is a kept position: a float mask encodes like its boolean view
    as_float = HAND_MASK.float() * torch.tensor([2.0, -1.0, 0.5, 3.0])
    assert [index_bits(as_float, e) for e in ("bitmap", "csr", "relative")] == [12, 12, 8]
    # a 1-D mask is one row: nz 2 * ceil(log2 5) = 6 column bits + 2 pointers * ceil(log2 3) = 4
    assert index_bits(torch.tensor([1, 0, 0, 1, 0]), "csr") == 10


def test_r_range_is_checked():
    with pytest.raises(ValueError, match="r_range is empty"):
        best_relative(HAND_MASK, r_range=[])
    with pytest.raises(ValueError, match="1..62"):
        best_relative(HAND_MASK, r_range=[True])  # a bool is not a gap width
    with pytest.raises(ValueError, match="1..62"):
        relative_bits(HAND_MASK, 63)
    # r_range is searched in ascending order whatever its order: (5, 3) -> r = 3 costs 41, r = 5 costs 10
    assert best_relative(HAND_MASK, r_range=(5, 3)) == (10, 5)
