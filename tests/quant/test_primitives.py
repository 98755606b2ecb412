"""Primitives: integer ranges, rounding with STE, fake-quant gradients (hand-computed), power of two."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunq.core.errors import PrunqError
from prunq.quant.primitives import check_bits, fake_quant, grad_scale, is_quantized, pow2_ste, qrange, round_ste

EXPECTED_RANGES = {
    2: ((-1, 1), (0, 3)),
    3: ((-3, 3), (0, 7)),
    4: ((-7, 7), (0, 15)),
    5: ((-15, 15), (0, 31)),
    6: ((-31, 31), (0, 63)),
    7: ((-63, 63), (0, 127)),
    8: ((-127, 127), (0, 255)),
}


@pytest.mark.parametrize("bits", range(2, 9))
def test_qrange_signed_narrow_and_unsigned(bits: int) -> None:
    signed, unsigned = EXPECTED_RANGES[bits]
    assert qrange(bits, True) == signed
    assert qrange(bits, False) == unsigned


@pytest.mark.parametrize("bits", [1, 9, 16, 32])
def test_qrange_rejects_unquantized_bits(bits: int) -> None:
    with pytest.raises(ValueError):
        qrange(bits, True)


def test_check_bits() -> None:
    assert [check_bits(b) for b in (2, 8, 16, 32)] == [2, 8, 16, 32]
    assert is_quantized(2) and is_quantized(8) and not is_quantized(16) and not is_quantized(32)
    for bad in (0, 1, 9, 12, 64, True, 4.0, "4"):
        with pytest.raises(PrunqError, match="field: .* is outside 2–8"):
            check_bits(bad, "field")


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    step=st.floats(1e-3, 10.0),
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64),
)
def test_fake_quant_values_lie_on_the_integer_grid(bits: int, signed: bool, step: float, values: list[float]) -> None:
    qmin, qmax = qrange(bits, signed)
    s = torch.tensor(step, dtype=torch.float64)
    x = torch.tensor(values, dtype=torch.float64)
    y = fake_quant(x, s, qmin, qmax)
    k = y / s
    assert torch.allclose(k, k.round(), atol=1e-9)
    assert k.round().min() >= qmin and k.round().max() <= qmax
    # Nearest level inside the range: error at most half a step.
    inside = (x / s >= qmin) & (x / s <= qmax)
    assert bool(((y - x)[inside].abs() <= s / 2 + 1e-9).all())
    # Zero is a level.
    assert fake_quant(torch.zeros(3, dtype=torch.float64), s, qmin, qmax).eq(0).all()


def test_round_ste_forward_and_identity_gradient() -> None:
    x = torch.tensor([0.4, 0.5, 1.5, -2.6], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 0.0, 2.0, -3.0]  # ties to even, like torch.round
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_grad_scale_value_and_gradient() -> None:
    x = torch.tensor([2.0, -1.0], requires_grad=True)
    y = grad_scale(x, 0.25)
    assert y.tolist() == [2.0, -1.0]
    (y * torch.tensor([1.0, 2.0])).sum().backward()
    assert x.grad.tolist() == [0.25, 0.5]


def test_ste_gradient_of_x_is_one_inside_zero_outside() -> None:
    # 3-bit signed: levels -3..3, step 0.5. "Inside" means round(x / s) is a level (as in the fused
    # torch kernels): 1.6 / 0.5 = 3.2 rounds to 3 (inside); 1.76 / 0.5 = 3.52 rounds to 4 (clipped).
    x = torch.tensor([-4.0, -1.76, -1.6, -0.2, 0.0, 0.7, 1.5, 1.6, 1.76, 9.0], requires_grad=True)
    fake_quant(x, torch.tensor(0.5), -3, 3).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_lsq_step_gradient_matches_hand_computation() -> None:
    # x / s = [0.6, -2.8, 10]; round -> [1, -3, clip 3]
    # d out_i / d s = round(x/s) - x/s inside, qmax where clipped: [0.4, -0.2, 3]
    x = torch.tensor([0.3, -1.4, 5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = fake_quant(x, s, -3, 3)
    assert torch.allclose(y, torch.tensor([0.5, -1.5, 1.5]))
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert s.grad.item() == pytest.approx(1 * 0.4 + 2 * (-0.2) + 3 * 3)  # 9.0
    assert x.grad.tolist() == [1.0, 2.0, 0.0]


def test_lsq_step_gradient_with_grad_scale() -> None:
    x = torch.tensor([0.3, -1.4, 5.0])
    s = torch.tensor(0.5, requires_grad=True)
    fake_quant(x, grad_scale(s, 0.1), -3, 3).sum().backward()
    assert s.grad.item() == pytest.approx(0.1 * (0.4 - 0.2 + 3.0))


def test_pow2_ste_rounds_in_log_domain_with_identity_gradient() -> None:
    s = torch.tensor([0.3, 0.7, 0.75, 1.0, 3.0, 5.0], requires_grad=True)
    p = pow2_ste(s)
    assert p.tolist() == [0.25, 0.5, 1.0, 1.0, 4.0, 4.0]
    p.sum().backward()
    assert s.grad.tolist() == [1.0] * 6


@settings(max_examples=40, deadline=None)
@given(st.floats(1e-6, 1e6))
def test_pow2_ste_is_a_power_of_two_within_sqrt2(step: float) -> None:
    p = pow2_ste(torch.tensor(step, dtype=torch.float64)).item()
    e = torch.log2(torch.tensor(p, dtype=torch.float64)).item()
    assert e == round(e)
    assert 2**-0.5 - 1e-9 <= p / step <= 2**0.5 + 1e-9
