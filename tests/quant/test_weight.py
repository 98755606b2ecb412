"""WeightQuantizer: per-channel steps in the canonical layout, ternary 2-bit, zero preservation, LSQ."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from prunq.core.errors import PrunqError
from prunq.core.layers import from_canonical, to_canonical
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
    return {"linear": (6,), "conv2d": (3, 5, 5), "convT2d_groups2": (4, 3, 3), "depthwise": (4, 5, 5), "conv1d": (2, 7)}[kind]


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
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16), kind=st.sampled_from(list(LAYERS)), per_channel=st.booleans())
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
    e = {i: (WeightQuantizer(layer, bits, init=i, power_of_two=pow2)(w) - w).pow(2).flatten(1).sum(1) for i in ("max", "mse")}
    if not pow2:  # with power-of-two steps, max init is rounded afterwards and is not a grid point
        assert (e["mse"] <= e["max"] + 1e-7).all()
    assert torch.isfinite(e["mse"]).all()


def test_power_of_two_steps() -> None:
    torch.manual_seed(3)
    layer = nn.Conv2d(3, 4, 3)
    q = WeightQuantizer(layer, bits=4, power_of_two=True)
    s = q.effective_step()
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    assert q.qparams()["power_of_two"] is True
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


def test_learn_false_freezes_step() -> None:
    layer = nn.Linear(4, 2)
    q = WeightQuantizer(layer, bits=4, learn=False)
    assert not q.step.requires_grad
    w = layer.weight.detach().clone().requires_grad_(True)
    q(w).sum().backward()
    assert w.grad is not None and q.step.grad is None


def test_qparams_and_repr() -> None:
    q = WeightQuantizer(nn.Conv2d(2, 3, 1), bits=5)
    p = q.qparams()
    assert set(p) == {"bits", "step", "per_channel", "power_of_two"}
    assert p["bits"] == 5 and p["step"].shape == (3,) and p["per_channel"] is True
    assert "bits=5" in repr(q)


def test_bad_arguments() -> None:
    with pytest.raises(PrunqError, match="bits=9"):
        WeightQuantizer(nn.Linear(2, 2), bits=9)
    with pytest.raises(PrunqError, match="init='median'"):
        WeightQuantizer(nn.Linear(2, 2), bits=4, init="median")
    with pytest.raises(PrunqError, match="not a compressible"):
        WeightQuantizer(nn.BatchNorm2d(2), bits=4)


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


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("learn", [True, False])
@pytest.mark.parametrize(
    "make", [lambda: nn.Conv2d(4, 6, 3), lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), lambda: nn.Linear(5, 3)]
)
def test_fused_forward_matches_the_composed_reference(make, per_channel, learn):
    mod = make()
    q = WeightQuantizer(mod, 3, per_channel=per_channel, learn=learn)
    w = mod.weight.detach().clone().requires_grad_()
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    wrt = [w, q.step] if learn else [w]
    a = q(w)
    ga = torch.autograd.grad((a * upstream).sum(), wrt)
    b = q.reference_forward(w)
    gb = torch.autograd.grad((b * upstream).sum(), wrt)
    assert torch.allclose(a, b, atol=1e-6)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-5)
