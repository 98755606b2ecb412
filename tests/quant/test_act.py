"""ActQuantizer: calibration (signed/unsigned; percentile, max, MSE on hand-made tensors), the fast
LSQ forward against the composed reference (values bit for bit, gradients), QParams, state-dict round trip."""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prunq.quant.act as act_module
from prunq.core.errors import PrunqError
from prunq.core.qparams import QParams
from prunq.quant.act import ActQuantizer


def calibrated(x: torch.Tensor | list[torch.Tensor], **kwargs) -> ActQuantizer:
    q = ActQuantizer(**{"bits": 8, **kwargs})
    q.observe()
    for t in x if isinstance(x, list) else [x]:
        assert q(t) is t  # observing passes the input through
    q.finish_calibration()
    return q


def test_unsigned_after_relu_signed_otherwise() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    relu = calibrated(torch.relu(x))
    assert not bool(relu.signed) and (relu.qmin, relu.qmax) == (0, 255)
    raw = calibrated(x)
    assert bool(raw.signed) and (raw.qmin, raw.qmax) == (-127, 127)
    with torch.no_grad():
        assert relu(x).min() == 0  # negatives clip to zero on an unsigned grid
        assert raw(x).min() < 0


def test_max_calibration_step() -> None:
    x = torch.tensor([0.0, 1.0, 2.0, 5.1])
    assert calibrated(x, calibration="max").step.item() == pytest.approx(5.1 / 255)
    assert calibrated(x - 3.0, calibration="max").step.item() == pytest.approx(3.0 / 127)  # max |x| = 3
    assert calibrated(x, bits=4, calibration="max").step.item() == pytest.approx(5.1 / 15)


def test_max_and_min_are_tracked_over_all_batches() -> None:
    q = calibrated([torch.tensor([0.5, 1.0]), torch.tensor([-0.2, 7.0]), torch.tensor([2.0])], calibration="max")
    assert bool(q.signed) and q.step.item() == pytest.approx(7.0 / 127)


def test_percentile_calibration_step() -> None:
    x = torch.arange(0, 101, dtype=torch.float32)  # percentile p of 0..100 is p
    assert calibrated(x, calibration="percentile", percentile=50.0).step.item() == pytest.approx(50 / 255)
    assert calibrated(x, calibration="percentile", percentile=99.0).step.item() == pytest.approx(99 / 255)
    assert calibrated(x, calibration="percentile", percentile=100.0).step.item() == pytest.approx(100 / 255)
    # signed: the percentile of |x|
    assert calibrated(-x, calibration="percentile", percentile=90.0).step.item() == pytest.approx(90 / 127)


def test_mse_calibration_step() -> None:
    # 1000 ones and one 10, unsigned 2-bit (levels 0..3). Squared error as a function of the step s
    # (1 -> level 1, 10 -> clipped to 3s): 1000 (1 - s)^2 + (10 - 3s)^2, minimal at s = 2060/2018.
    # The grid of clipping ratios is 1 % of max/3 = 0.0333 wide; max calibration would give 3.33.
    x = torch.cat([torch.ones(1000), torch.tensor([10.0])])
    s = calibrated(x, bits=2, calibration="mse").step.item()
    assert abs(s - 2060 / 2018) < 10 / 3 / 100
    assert calibrated(x, bits=2, calibration="max").step.item() == pytest.approx(10 / 3)


def test_bounded_sample_keeps_exact_extremes() -> None:
    torch.manual_seed(1)
    q = ActQuantizer(bits=8, calibration="percentile", percentile=100.0, max_samples=64)
    q.observe()
    for _ in range(5):
        q(torch.rand(1000))
    q(torch.tensor([42.0]))
    assert q._sample.numel() <= 64
    q.finish_calibration()
    assert q.step.item() == pytest.approx(42 / 255)


def test_uncalibrated_forward_raises() -> None:
    q = ActQuantizer(bits=8)
    with pytest.raises(RuntimeError, match="not calibrated"):
        q(torch.ones(2))
    with pytest.raises(RuntimeError, match="no input was observed"):
        q.observe()
        q.finish_calibration()


def test_all_zero_input_gives_positive_step() -> None:
    for c in ("percentile", "max", "mse"):
        q = calibrated(torch.zeros(10), calibration=c)
        assert q.step.item() > 0
        assert q(torch.zeros(3)).eq(0).all()


def test_bad_arguments() -> None:
    with pytest.raises(PrunqError, match="bits=1"):
        ActQuantizer(bits=1)
    with pytest.raises(PrunqError, match="calibration='entropy'"):
        ActQuantizer(bits=8, calibration="entropy")
    with pytest.raises(PrunqError, match=r"ActQuantizer.percentile: 0 is outside \(0, 100\]"):
        ActQuantizer(bits=8, percentile=0)
    with pytest.raises(PrunqError, match="impl='fused'"):
        ActQuantizer(bits=8, impl="fused")


def _run(q: ActQuantizer, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xi = x.detach().clone().requires_grad_(True)
    q.step.grad = None
    y = q(xi)
    y.backward(upstream)
    return y.detach(), xi.grad, q.step.grad.clone()


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    shift=st.sampled_from([0.0, -0.5]),  # non-negative input -> unsigned grid; shifted -> signed
    seed=st.integers(0, 2**16),
    pow2=st.booleans(),
    shape=st.sampled_from([(4, 3, 5), (2, 3, 6, 5), (8,)]),
    channels_last=st.booleans(),
)
def test_auto_forward_matches_composed_reference(
    bits: int, shift: float, seed: int, pow2: bool, shape: tuple, channels_last: bool
) -> None:
    torch.manual_seed(seed)
    x = torch.rand(shape) + shift
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    q = calibrated(x, bits=bits, calibration="max", power_of_two=pow2)
    ref = ActQuantizer(bits=bits, calibration="max", power_of_two=pow2, impl="reference")
    with torch.no_grad():
        q.step.mul_(0.7)  # make some inputs clip
    ref.load_state_dict(q.state_dict())
    # signed iff the calibration saw a negative value (8 draws of rand() - 0.5 can all be >= 0)
    assert bool(q.signed) == bool(x.min() < 0) and q.impl == "auto" and ref.impl == "reference"
    upstream = torch.linspace(-1, 2, x.numel()).view(shape)
    (ya, gxa, gsa), (yr, gxr, gsr) = _run(q, x, upstream), _run(ref, x, upstream)
    assert torch.equal(ya, yr)  # bit-identical values
    assert torch.equal(gxa == 0, gxr == 0)  # same clip decisions
    assert torch.allclose(gxa, gxr, rtol=1e-6, atol=0)
    assert torch.allclose(gsa, gsr, rtol=1e-4, atol=1e-6)
    # Eval / no-grad: the same values bit for bit as the training forward, and no graph.
    with torch.no_grad():
        y0 = q(x)
    assert torch.equal(y0, ya) and y0.grad_fn is None
    # channels_last in, channels_last out (the next conv would otherwise convert back), on every path.
    assert y0.stride() == x.stride() and ya.stride() == x.stride() and gxa.stride() == x.stride()


def test_lsq_step_gradient_by_hand() -> None:
    # 3-bit signed (levels -3..3), step 0.5, x = [0.3, -1.4, 5.0] (one sample of 3 elements):
    # dL/ds = (0.4 - 0.2 + 3) * 1/sqrt(N * Qp) with N = 3, Qp = 3.
    q = calibrated(torch.tensor([-1.0, 1.0]), bits=3, calibration="max")
    with torch.no_grad():
        q.step.fill_(0.5)
    x = torch.tensor([[0.3, -1.4, 5.0]], requires_grad=True)
    y = q(x)
    assert y.tolist() == [[0.5, -1.5, 1.5]]
    y.sum().backward()
    assert q.step.grad.item() == pytest.approx(3.2 / 3.0)
    assert x.grad.tolist() == [[1.0, 1.0, 0.0]]


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_learn_false_freezes_step_and_passes_ste(impl: str) -> None:
    q = calibrated(torch.tensor([-1.0, 1.0]), bits=3, calibration="max", learn=False, impl=impl)
    assert not q.step.requires_grad
    x = torch.tensor([0.3, -0.5, 5.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]
    q.requires_grad_(True)  # e.g. model.requires_grad_(True): the step must stay frozen
    q(x).sum().backward()
    assert q.step.grad is None


def test_power_of_two_step() -> None:
    q = calibrated(torch.tensor([0.0, 3.0]), bits=4, calibration="max", power_of_two=True)  # 3/15 = 0.2
    assert q.effective_step().item() == 0.25
    with torch.no_grad():
        assert q(torch.tensor([0.3, 0.4])).tolist() == [0.25, 0.5]


def test_state_dict_round_trip_into_fresh_instance() -> None:
    torch.manual_seed(2)
    x = torch.randn(32) - 0.3
    q = calibrated(x, bits=6, calibration="percentile", percentile=99.0)
    sd = q.state_dict()
    assert set(sd) == {"step", "signed", "calibrated"}
    fresh = ActQuantizer(bits=6, calibration="percentile", percentile=99.0)
    fresh.load_state_dict(sd)
    assert bool(fresh.signed) and bool(fresh.calibrated) and (fresh.qmin, fresh.qmax) == (-31, 31)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    assert "signed=True" in repr(fresh) and "bits=6" in repr(fresh)
    assert fresh.qparams().signed is True


def test_qparams_signed_and_unsigned() -> None:
    relu = calibrated(torch.tensor([0.0, 1.0, 3.0]), bits=4, calibration="max")
    p = relu.qparams()
    assert isinstance(p, QParams)
    assert (p.bits, p.axis, p.signed, p.narrow, p.power_of_two, p.zero_point) == (4, None, False, False, False, 0)
    assert (p.qmin, p.qmax) == (relu.qmin, relu.qmax) == (0, 15)
    assert p.step.shape == () and p.step.item() == pytest.approx(3 / 15) and not p.step.requires_grad
    raw = calibrated(torch.tensor([-2.0, 1.0]), bits=3, calibration="max", power_of_two=True)
    p = raw.qparams()
    assert (p.signed, p.narrow, p.power_of_two) == (True, True, True)
    assert (p.qmin, p.qmax) == (raw.qmin, raw.qmax) == (-3, 3)
    assert p.step.item() == 0.5  # 2/3 rounded to a power of two in the log domain
    with torch.no_grad():  # the record describes the forward: Q(x) == clamp(round(x / step)) * step
        x = torch.tensor([-9.0, -0.7, 0.2, 1.3])
        assert torch.equal(raw(x), torch.clamp(torch.round(x / p.step), p.qmin, p.qmax) * p.step)


def test_doctests() -> None:
    assert doctest.testmod(act_module).failed == 0


def test_recalibration_updates_signedness() -> None:
    q = calibrated(torch.tensor([-1.0, 1.0]), calibration="max")
    assert bool(q.signed)
    q.observe()
    q(torch.tensor([0.0, 2.0]))
    q.finish_calibration()
    assert not bool(q.signed) and q.step.item() == pytest.approx(2 / 255)
