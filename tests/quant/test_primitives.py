"""Primitives: integer ranges, rounding with STE, fake-quant gradients (hand-computed), power of two, and
the fast :func:`lsq_fake_quant` against the composed definition (values bit for bit, gradients)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunq.core import config
from prunq.core.errors import PrunqError
from prunq.quant import primitives
from prunq.quant.primitives import (
    check_bits,
    fake_quant,
    grad_scale,
    is_quantized,
    lsq_fake_quant,
    pow2_ste,
    qrange,
    round_ste,
)

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


def test_one_bit_width_rule() -> None:
    # The quantizers, recipes and the CLI share prunq.core.config's rule: the same objects, not copies.
    assert primitives.check_bits is config.check_bits
    assert primitives.QUANT_BITS is config.QUANT_BITS and primitives.FLOAT_BITS is config.FLOAT_BITS


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


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 1e-3, 0.1, 1 / 3, 1 / math.sqrt(3 * 7)]))
def test_grad_scale_value_is_bit_exact(seed: int, scale: float) -> None:
    # The value must be x itself (not x*s + (x - x*s), which can be one ulp off): the fast fake-quant
    # uses the step directly and must give the same values as the composed definition.
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(64, generator=g) * 10 ** torch.empty(64).uniform_(-4, 2, generator=g)
    assert torch.equal(grad_scale(x, scale), x)
    assert torch.equal(grad_scale(x, torch.full_like(x, scale)), x)


def test_lsq_fake_quant_by_hand() -> None:
    # Same numbers as test_lsq_step_gradient_matches_hand_computation, with a gradient factor 0.1:
    # d/ds = 0.1 * (1 * 0.4 + 2 * (-0.2) + 3 * 3) = 0.9; d/dx = [1, 2, 0] (5.0 clips).
    x = torch.tensor([0.3, -1.4, 5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = lsq_fake_quant(x, s, -3, 3, grad_factor=0.1)
    assert y.tolist() == [0.5, -1.5, 1.5]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert s.grad.item() == pytest.approx(0.9)
    assert x.grad.tolist() == [1.0, 2.0, 0.0]


def test_lsq_fake_quant_unsigned_clips_below_and_above() -> None:
    # Unsigned 2-bit (levels 0..3), step 1: -0.6 rounds to -1 (clipped to 0: d/dx = 0, d/ds = qmin = 0);
    # -0.5 rounds (half to even) to 0, inside: d/ds = 0 - (-0.5) = 0.5; 0.0 is inside with d/ds = 0;
    # 3.5 rounds to 4 (clipped: d/ds = 3); 3.4 rounds to 3 (inside, d/ds = -0.4).
    x = torch.tensor([-0.6, -0.5, 0.0, 3.4, 3.5], requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    y = lsq_fake_quant(x, s, 0, 3)
    assert y.tolist() == [0.0, 0.0, 0.0, 3.0, 3.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert s.grad.item() == pytest.approx(0.5 - 0.4 + 3.0)


def _ref_and_fast(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, factor, upstream: torch.Tensor):
    out = []
    for fn in (
        lambda a, b: fake_quant(a, grad_scale(b, factor), qmin, qmax),
        lambda a, b: lsq_fake_quant(a, b, qmin, qmax, factor),
    ):
        xi = x.detach().clone().requires_grad_(True)
        si = step.detach().clone().requires_grad_(True)
        y = fn(xi, si)
        y.backward(upstream)
        out.append((y.detach(), xi.grad, si.grad))
    return out


SHAPES = [(7,), (3, 5), (2, 3, 4, 5), (4, 6, 3, 3), (1, 1, 8, 8)]


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([2, 3, 4, 8]),
    signed=st.booleans(),
    pow2=st.booleans(),
    shape=st.sampled_from(SHAPES),
    per_channel=st.booleans(),
    channels_last=st.booleans(),
    tensor_factor=st.booleans(),
)
def test_lsq_fake_quant_matches_the_composed_definition(
    seed: int,
    bits: int,
    signed: bool,
    pow2: bool,
    shape: tuple,
    per_channel: bool,
    channels_last: bool,
    tensor_factor: bool,
) -> None:
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = qrange(bits, signed)
    x = torch.randn(shape, generator=g) * 2
    if not signed:
        x = x + 1.0  # mostly non-negative, with some values below the grid
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    n = shape[0] if per_channel else 1
    view = (n,) + (1,) * (len(shape) - 1) if per_channel else ()
    step = (torch.rand(n, generator=g) * 0.5 + 0.05) * 4 / qmax  # small enough that some values clip
    if pow2:
        step = torch.exp2(torch.round(torch.log2(step)))
    step = step.reshape(view)
    factor = (torch.rand(n, generator=g) + 0.1).reshape(view) if tensor_factor else 1 / math.sqrt(7 * qmax)
    upstream = torch.randn(shape, generator=g)
    (yr, gxr, gsr), (yf, gxf, gsf) = _ref_and_fast(x, step, qmin, qmax, factor, upstream)
    assert torch.equal(yf, yr)  # bit-identical values
    assert torch.equal(gxf == 0, gxr == 0)  # the same clip decisions
    # The composed form's grad_x is (g * s) / s: equal to g up to one rounding.
    assert torch.allclose(gxf, gxr, rtol=1e-6, atol=0)
    assert gsf.shape == step.shape
    assert torch.allclose(gsf, gsr, rtol=1e-4, atol=1e-6)
    # No-grad path: bit-identical to the training forward, no graph, input untouched.
    x_before = x.clone()
    with torch.no_grad():
        y0 = lsq_fake_quant(x, step, qmin, qmax, factor)
    assert torch.equal(y0, yr) and y0.grad_fn is None and torch.equal(x, x_before)
    # Elementwise: the memory format of x is kept on every path.
    assert y0.stride() == x.stride() and yf.stride() == x.stride() and gxf.stride() == x.stride()


def test_lsq_fake_quant_frozen_step_and_frozen_input() -> None:
    x = torch.tensor([0.3, -1.4, 5.0])
    s = torch.tensor(0.5, requires_grad=True)
    lsq_fake_quant(x, s, -3, 3).sum().backward()  # x needs no grad: only the step's
    assert s.grad.item() == pytest.approx(0.4 - 0.2 + 3.0)
    xg = x.clone().requires_grad_(True)
    y = lsq_fake_quant(xg, torch.tensor(0.5), -3, 3)  # frozen step: only x's
    y.sum().backward()
    assert xg.grad.tolist() == [1.0, 1.0, 0.0]
    y = lsq_fake_quant(x, torch.tensor(0.5), -3, 3)  # nothing needs a gradient: no graph
    assert y.grad_fn is None and y.tolist() == [0.5, -1.5, 1.5]


def test_doctests() -> None:
    assert doctest.testmod(primitives).failed == 0
