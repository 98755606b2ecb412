"""WeightQuantizer: per-channel steps in the canonical layout, ternary 2-bit, zero preservation, LSQ (and its
gradient scale N), the fast forward against the composed reference, QParams."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import prunq.quant.weight as weight_module
from prunq.core.errors import PrunqError
from prunq.core.layers import from_canonical, to_canonical
from prunq.core.qparams import QParams
from prunq.prune.masks import Mask, attach_mask, set_mask, zero_pruned_
from prunq.quant.primitives import fake_quant
from prunq.quant.weight import WeightQuantizer, weight_quantizer

LAYERS = {
    "linear": lambda: nn.Linear(6, 5),
    "conv2d": lambda: nn.Conv2d(3, 4, 3),
    "convT2d_groups2": lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, groups=4),
    "conv1d": lambda: nn.Conv1d(2, 3, 5),
}


def _channel_scaled(layer: nn.Module) -> torch.Tensor:
    """Give output channel j (canonical row) a max |w| of exactly j + 1; return the canonical weight."""
    with torch.no_grad():
        c = to_canonical(layer.weight.detach().clone(), layer)
        c = c / c.flatten(1).abs().amax(1).view(-1, *([1] * (c.dim() - 1)))
        c = c * torch.arange(1, c.shape[0] + 1, dtype=c.dtype).view(-1, *([1] * (c.dim() - 1)))
        layer.weight.copy_(from_canonical(c, layer))
    return c


@pytest.mark.parametrize("kind", list(LAYERS))
def test_per_channel_step_is_max_over_canonical_rows(kind: str) -> None:
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    c = _channel_scaled(layer)
    q = WeightQuantizer(layer, bits=4)
    out = c.shape[0]
    assert q.step.shape == (out,)
    assert torch.allclose(q.step, torch.arange(1, out + 1, dtype=torch.float32) / 7)
    # The parametrized forward quantizes each canonical row with its own step.
    parametrize.register_parametrization(layer, "weight", q)
    expected = from_canonical(fake_quant(c, q.step.view(-1, *([1] * (c.dim() - 1))), -7, 7), layer)
    assert torch.allclose(layer.weight, expected)
    assert layer(torch.randn(2, *_input_shape(kind))).isfinite().all()


def _input_shape(kind: str) -> tuple[int, ...]:
    return {
        "linear": (6,),
        "conv2d": (3, 5, 5),
        "convT2d_groups2": (4, 3, 3),
        "depthwise": (4, 5, 5),
        "conv1d": (2, 7),
    }[kind]


def test_per_tensor_step() -> None:
    layer = nn.Conv2d(3, 4, 3)
    c = _channel_scaled(layer)
    q = WeightQuantizer(layer, bits=8, per_channel=False)
    assert q.step.shape == (1,)
    assert q.step.item() == pytest.approx(4 / 127)
    assert c.abs().max() == 4


def test_two_bit_weights_are_ternary_per_channel() -> None:
    torch.manual_seed(1)
    layer = nn.Conv2d(3, 4, 3)
    parametrize.register_parametrization(layer, "weight", q := WeightQuantizer(layer, bits=2))
    w = layer.weight.detach()
    for j in range(4):
        levels = set(torch.unique(w[j] / q.step[j]).round().tolist())
        assert levels <= {-1.0, 0.0, 1.0}
    assert set(torch.unique(q.int_weight(layer.parametrizations.weight.original)).tolist()) <= {-1, 0, 1}


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8), seed=st.integers(0, 2**16), kind=st.sampled_from(list(LAYERS)), per_channel=st.booleans()
)
def test_int_weight_range_and_reconstruction(bits: int, seed: int, kind: str, per_channel: bool) -> None:
    torch.manual_seed(seed)
    layer = LAYERS[kind]()
    q = WeightQuantizer(layer, bits=bits, per_channel=per_channel)
    w = layer.weight.detach()
    k = q.int_weight(w)
    assert k.dtype == torch.int8 and k.shape == w.shape
    qp = 2 ** (bits - 1) - 1
    assert int(k.min()) >= -qp and int(k.max()) <= qp
    # Q(w) == k * step, where step is applied per canonical row.
    ck = to_canonical(k.float(), layer)
    step = q.effective_step().view(-1, *([1] * (ck.dim() - 1)))
    assert torch.allclose(q(w), from_canonical(ck * step, layer))


def test_all_zero_channels_get_a_small_positive_step() -> None:
    layer = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        layer.weight[1].zero_()
    for init in ("max", "mse"):
        q = WeightQuantizer(layer, bits=4, init=init)
        assert torch.isfinite(q.step).all() and (q.step > 0).all()
        assert q.step[1] <= q.step.max()
        out = q(layer.weight.detach())
        assert out[1].eq(0).all() and torch.isfinite(out).all()
    with torch.no_grad():
        layer.weight.zero_()
    q = WeightQuantizer(layer, bits=4)
    assert (q.step > 0).all() and torch.isfinite(q.step).all()


def test_mse_init_is_no_worse_than_max() -> None:
    torch.manual_seed(2)
    layer = nn.Linear(1024, 8)
    with torch.no_grad():
        # Gaussian rows: max |w| is ~3.3 sigma, the 3-bit MSE-optimal clip is far lower.
        layer.weight.copy_(torch.randn(8, 1024))
    w = layer.weight.detach()
    err = {}
    for init in ("max", "mse"):
        q = WeightQuantizer(layer, bits=3, init=init)
        err[init] = (q(w) - w).pow(2).sum(1)
    assert (err["mse"] <= err["max"] + 1e-7).all()
    assert err["mse"].sum() < 0.9 * err["max"].sum()


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16), pow2=st.booleans())
def test_mse_init_no_worse_than_max_property(bits: int, seed: int, pow2: bool) -> None:
    torch.manual_seed(seed)
    layer = nn.Conv2d(3, 4, 3)
    w = layer.weight.detach()
    e = {
        i: (WeightQuantizer(layer, bits, init=i, power_of_two=pow2)(w) - w).pow(2).flatten(1).sum(1)
        for i in ("max", "mse")
    }
    if not pow2:  # with power-of-two steps, max init is rounded afterwards and is not a grid point
        assert (e["mse"] <= e["max"] + 1e-7).all()
    assert torch.isfinite(e["mse"]).all()


def test_power_of_two_steps() -> None:
    torch.manual_seed(3)
    layer = nn.Conv2d(3, 4, 3)
    q = WeightQuantizer(layer, bits=4, power_of_two=True)
    s = q.effective_step()
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    assert q.qparams().power_of_two is True
    k = q(layer.weight.detach()) / s.view(-1, 1, 1, 1)
    assert torch.equal(k, k.round())


def test_lsq_step_gradient_is_scaled_by_one_over_sqrt_n_qp() -> None:
    torch.manual_seed(4)
    layer = nn.Linear(6, 3)
    w = layer.weight.detach()
    q = WeightQuantizer(layer, bits=4)
    q(w).sum().backward()
    ref_step = q.step.detach().clone().requires_grad_(True)
    fake_quant(w, ref_step.view(-1, 1), -7, 7).sum().backward()
    assert torch.allclose(q.step.grad, ref_step.grad / math.sqrt(6 * 7))


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_learn_false_freezes_step(impl: str) -> None:
    layer = nn.Linear(4, 2)
    q = WeightQuantizer(layer, bits=4, learn=False, impl=impl)
    assert not q.step.requires_grad
    w = layer.weight.detach().clone().requires_grad_(True)
    q(w).sum().backward()
    assert w.grad is not None and q.step.grad is None
    q.requires_grad_(True)  # e.g. model.requires_grad_(True): the step must stay frozen
    q(w).sum().backward()
    assert q.step.grad is None


def test_qparams_and_repr() -> None:
    layer = nn.Conv2d(2, 3, 1)
    q = WeightQuantizer(layer, bits=5)
    p = q.qparams()
    assert isinstance(p, QParams)
    assert (p.bits, p.axis, p.signed, p.narrow, p.power_of_two, p.zero_point) == (5, 0, True, True, False, 0)
    assert (p.qmin, p.qmax) == (q.qmin, q.qmax) == (-15, 15)
    assert p.step.shape == (3,) and not p.step.requires_grad and torch.equal(p.step, q.effective_step())
    # The record describes the forward: Q(w) == clamp(round(w / step), qmin, qmax) * step per output channel.
    w = layer.weight.detach()
    assert torch.equal(
        q(w), torch.clamp(torch.round(w / p.step.view(-1, 1, 1, 1)), p.qmin, p.qmax) * p.step.view(-1, 1, 1, 1)
    )
    t = WeightQuantizer(layer, bits=3, per_channel=False, power_of_two=True).qparams()
    assert (t.axis, t.power_of_two, tuple(t.step.shape), t.num_steps) == (None, True, (1,), 1)
    assert "bits=5" in repr(q) and "grad_n='all'" in repr(q)


def test_bad_arguments() -> None:
    with pytest.raises(PrunqError, match="bits=9"):
        WeightQuantizer(nn.Linear(2, 2), bits=9)
    with pytest.raises(PrunqError, match="init='median'"):
        WeightQuantizer(nn.Linear(2, 2), bits=4, init="median")
    with pytest.raises(PrunqError, match="not a compressible"):
        WeightQuantizer(nn.BatchNorm2d(2), bits=4)
    with pytest.raises(PrunqError, match="grad_n='some'"):
        WeightQuantizer(nn.Linear(2, 2), bits=4, grad_n="some")
    with pytest.raises(PrunqError, match="impl='fused'"):
        WeightQuantizer(nn.Linear(2, 2), bits=4, impl="fused")


@pytest.mark.parametrize("kind", list(LAYERS))
def test_pruned_weights_stay_exactly_zero_through_qat(kind: str) -> None:
    torch.manual_seed(5)
    layer = LAYERS[kind]()
    attach_mask(layer, soft=False)
    shadow = layer.parametrizations.weight.original
    set_mask(layer, (torch.rand_like(shadow) > 0.7).float())
    zero_pruned_(layer)
    pruned = layer.parametrizations.weight[0].mask == 0
    q = WeightQuantizer(layer, bits=3)
    parametrize.register_parametrization(layer, "weight", q)
    assert isinstance(layer.parametrizations.weight[0], Mask) and weight_quantizer(layer) is q
    assert layer.weight[pruned].eq(0).all()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(4, *_input_shape(kind))).pow(2).mean().backward()
        opt.step()
    assert layer.weight[pruned].eq(0).all()
    assert shadow[pruned].eq(0).all()
    assert q.int_weight(layer.weight.detach())[pruned].eq(0).all()


def _grads(q: WeightQuantizer, w: torch.Tensor, upstream: torch.Tensor, reference: bool):
    wi = w.detach().clone().requires_grad_(True)
    q.step.grad = None
    y = q.reference_forward(wi) if reference else q(wi)
    y.backward(upstream)
    return y.detach(), wi.grad, None if q.step.grad is None else q.step.grad.clone()


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(list(LAYERS)),
    bits=st.sampled_from([2, 3, 4, 8]),
    per_channel=st.booleans(),
    learn=st.booleans(),
    pow2=st.booleans(),
    grad_n=st.sampled_from(["all", "nonzero"]),
    sparse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_auto_forward_matches_the_composed_reference(
    kind, bits, per_channel, learn, pow2, grad_n, sparse, seed
) -> None:
    torch.manual_seed(seed)
    layer = LAYERS[kind]()
    with torch.no_grad():
        if sparse:  # pruned zeros, and a whole pruned channel (canonical row 0)
            layer.weight.mul_((torch.rand_like(layer.weight) > 0.6).float())
            c = to_canonical(layer.weight, layer)
            c[0].zero_()
            layer.weight.copy_(from_canonical(c, layer))
    q = WeightQuantizer(layer, bits, per_channel=per_channel, learn=learn, power_of_two=pow2, grad_n=grad_n)
    with torch.no_grad():
        q.step.mul_(0.6)  # some weights clip
    w = layer.weight.detach()
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    (ya, gwa, gsa), (yr, gwr, gsr) = _grads(q, w, upstream, False), _grads(q, w, upstream, True)
    assert torch.equal(ya, yr)  # bit-identical values
    assert torch.equal(gwa == 0, gwr == 0)
    assert torch.allclose(gwa, gwr, rtol=1e-6, atol=0)
    if learn:
        assert torch.allclose(gsa, gsr, rtol=1e-4, atol=1e-7)
    else:
        assert gsa is None and gsr is None
    with torch.no_grad():  # eval / no-grad: the same values bit for bit, no graph
        y0 = q(w)
    assert torch.equal(y0, ya) and y0.grad_fn is None
    if sparse:
        assert ya[w == 0].eq(0).all()


def test_impl_reference_is_the_composed_forward() -> None:
    layer = nn.Conv2d(3, 4, 3)
    q = WeightQuantizer(layer, 4, impl="reference")
    w = layer.weight.detach().clone().requires_grad_(True)
    y = q(w)
    assert y.grad_fn is not None and "LSQ" not in type(y.grad_fn).__name__
    assert torch.equal(y, WeightQuantizer(layer, 4)(w)) and "impl='reference'" in repr(q)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_grad_n_counts_the_nonzero_weights_of_each_channel(impl: str) -> None:
    # 3-bit (Qp = 3), step 0.5 per row, 4 weights per row. Upstream gradient 1 everywhere.
    #   row 0: [0.3, 0, 0, -1.4]  -> raw d/ds = (1 - 0.6) + 0 + 0 + (-3 + 2.8) = 0.2;     2 non-zero weights
    #   row 1: [0.3, 0.2, 5.0, 1] -> raw d/ds = 0.4 + (0 - 0.4) + 3 (clipped) + 0 = 3.0;  4 non-zero
    #   row 2: all zero            -> raw d/ds = 0;                                       N = max(0, 1) = 1
    layer = nn.Linear(4, 3, bias=False)
    w = torch.tensor([[0.3, 0.0, 0.0, -1.4], [0.3, 0.2, 5.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    raw = torch.tensor([0.2, 3.0, 0.0])
    for grad_n, n in (("all", torch.tensor([4.0, 4.0, 4.0])), ("nonzero", torch.tensor([2.0, 4.0, 1.0]))):
        q = WeightQuantizer(layer, bits=3, grad_n=grad_n, impl=impl)
        with torch.no_grad():
            q.step.fill_(0.5)
        y = q(w)
        assert torch.equal(y, torch.tensor([[0.5, 0.0, 0.0, -1.5], [0.5, 0.0, 1.5, 1.0], [0.0, 0.0, 0.0, 0.0]]))
        y.sum().backward()
        assert torch.allclose(q.step.grad, raw / torch.sqrt(n * 3)), grad_n


def test_grad_n_nonzero_per_tensor_and_through_the_mask() -> None:
    # Per tensor, N = the non-zero weights of the whole (masked) input: the mask's zeros do not count.
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -0.7, 0.2, 0.9], [0.5, 0.1, -0.4, 0.8]]))
    attach_mask(layer)
    set_mask(layer, torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
    q = WeightQuantizer(layer, bits=4, per_channel=False, grad_n="nonzero")
    parametrize.register_parametrization(layer, "weight", q)
    assert q._grad_factor(layer.parametrizations.weight[0](layer.parametrizations.weight.original)) == pytest.approx(
        1 / math.sqrt(3 * 7)
    )
    layer.weight.sum().backward()
    ref = q.step.detach().clone().requires_grad_(True)
    masked = torch.tensor([[0.3, 0.0, 0.0, 0.9], [0.5, 0.0, 0.0, 0.0]])
    fake_quant(masked, ref, -7, 7).sum().backward()
    assert torch.allclose(q.step.grad, ref.grad / math.sqrt(3 * 7))


def test_doctests() -> None:
    assert doctest.testmod(weight_module).failed == 0
