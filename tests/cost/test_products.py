"""Activation x activation products (prunq.cost.products), counts worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunq.core.attention import DecomposedAttention
from prunq.cost.macs import count_attention_macs
from prunq.cost.products import ActSite, count_activation_products
from prunq.quant.act import ActQuantizer

class _Times(nn.Module):
    """``a * b`` (two activations), ``a * 2.0`` and ``a * one-element buffer`` (rescales: not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("s", torch.tensor([3.0]))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b + (a * 2.0) * self.s


def _one(sites: list[ActSite]) -> ActSite:
    assert len(sites) == 1, sites
    return sites[0]


def test_elementwise_product_of_two_activations():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    s = _one(count_activation_products(_Times(), (a, b)))
    # 3 * 4 = 12 products per example (24 over the batch of 2); both operands float: 32 x 32
    assert (s.name, s.module, s.op, s.kind, s.bits, s.calls) == ("<model>:mul", "", "mul", "act*act", (32, 32), 1)
    assert s.macs == s.dense_macs == 12 and s.bops == 12 * 32 * 32
    # broadcasting: (2, 3, 4) * (2, 1, 4) is still one multiply per output element, 12 per example
    assert _one(count_activation_products(_Times(), (a, b[:, :1]))).macs == 12
    assert _one(count_activation_products(_Times(), (a, b), batch_size=1)).macs == 24
    assert s.to_dict()["bits"] == [32, 32]


class _SoftArgmin(nn.Module):
    """``(softmax(x) * values).sum(1)`` with fixed values ``[0, 1, 2, 3]``: a product with a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("values", torch.arange(4.0).view(1, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(x, 1) * self.values).sum(1)


def test_product_with_a_constant_tensor_counts_at_32_bits_without_its_zeros():
    s = _one(count_activation_products(_SoftArgmin(), (torch.randn(2, 4, 5),)))
    # 4 disparities x 5 positions = 20 multiplies per example; the value 0 is a zero "weight": 15 live
    assert (s.kind, s.bits, s.dense_macs, s.macs, s.bops) == ("act*const", (32, 32), 20, 15, 15 * 32 * 32)


class _Correlation(nn.Module):
    """A shared conv, then a correlation volume over ``n_disp`` shifts: ``mean_c left[c, x] * right[c, x - d]``."""

    def __init__(self, channels: int = 4, n_disp: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 1, bias=False)
        self.n_disp = n_disp

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        fl, fr = self.conv(left), self.conv(right)
        w = fl.shape[-1]
        return torch.cat([(fl[..., d:] * fr[..., : w - d]).mean(1) for d in range(self.n_disp)], -1)


def test_correlation_volume():
    x = torch.randn(2, 1, 2, 5)
    s = _one(count_activation_products(_Correlation(), (x, x)))
    # C=4 channels, h=2, w=5, shifts d=0,1,2: 4 * 2 * (5 + 4 + 3) = 96 products per example, in 3 calls;
    # the 1x1 conv's own multiplies are weight MACs, not counted here
    assert (s.name, s.calls, s.macs, s.kind) == ("<model>:mul", 3, 96, "act*act")


def test_correlation_dead_channel_is_not_counted():
    m = _Correlation()
    with torch.no_grad():
        m.conv.weight[1] = 0.0  # filter 1 pruned, no bias: channel 1 of both feature maps is zero
    x = torch.rand(2, 1, 2, 5)
    s = _one(count_activation_products(m, (x, x)))
    assert (s.dense_macs, s.macs) == (96, 72)  # 3 live channels of 4
    assert _one(count_activation_products(m, (x, x), dead_channels=False)).macs == 96
    # an example that happens to be zero does not make channels dead: the probe run's inputs are random
    z = torch.zeros(2, 1, 2, 5)
    assert _one(count_activation_products(m, (z, z))).macs == 72


class _Attn(nn.Module):
    def __init__(self, sdpa: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.att = DecomposedAttention(8, 2, batch_first=True)
        self.sdpa = sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.att(x, x, x, need_weights=not self.sdpa)[0]


@pytest.mark.parametrize("sdpa", [False, True])
def test_attention_score_and_value_products(sdpa):
    x = torch.randn(3, 5, 8)  # B=3, T=5, E=8 = 2 heads x d=4
    sites = count_activation_products(_Attn(sdpa), (x,))
    # Q K^T and A V: B * H * T * T * d = 3 * 2 * 5 * 5 * 4 = 600 each, 200 per example
    if sdpa:
        assert [(s.name, s.macs) for s in sites] == [("att:scaled_dot_product_attention", 400)]
    else:
        assert [(s.name, s.op, s.macs) for s in sites] == [
            ("att:matmul#1", "matmul", 200),
            ("att:matmul#2", "matmul", 200),
        ]
    assert all(s.kind == "act*act" and s.bits == (32, 32) for s in sites)
    assert sum(s.macs for s in sites) == count_attention_macs(_Attn(sdpa), (x,))["att"] == 400


@pytest.mark.parametrize("sdpa", [False, True])
def test_attention_dead_head_is_not_counted(sdpa):
    m = _Attn(sdpa)
    with torch.no_grad():  # head 0's query features (q_proj rows 0-3) pruned, bias zero
        m.att.q_proj.weight[:4] = 0.0
        m.att.q_proj.bias.zero_()
    sites = count_activation_products(m, (torch.randn(3, 5, 8),))
    # Q K^T loses head 0 (100 of 200 per example); A V still multiplies every (softmax) weight
    assert sum(s.macs for s in sites) == 100 + 200
    assert sum(s.dense_macs for s in sites) == 400


class _HandAttention(nn.Module):
    """Hand-written single-head attention with einsum, on quantized q / k (8 and 4 bits)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 6)
        self.qq = ActQuantizer(bits=8, calibration="max")
        self.kq = ActQuantizer(bits=4, calibration="max")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.qq(self.q(x)), self.kq(x)
        scores = torch.einsum("btd,bsd->bts", q, torch.relu(k).transpose(1, 2).transpose(1, 2))
        return torch.softmax(scores * 0.5, -1) @ x


def test_quantized_operands_cost_their_bits_and_quantizers_are_not_counted():
    m = _HandAttention()
    x = torch.randn(2, 3, 6)  # B=2, T=3, d=6
    for q in (m.qq, m.kq):
        q.observe()
    m(x)
    for q in (m.qq, m.kq):
        q.finish_calibration()
    a, b = count_activation_products(m, (x,))
    # q K^T: 3 * 3 * 6 = 54 per example at 8 x 4 bits (relu and transposes keep k on its 4-bit grid);
    # softmax(...) @ x: 54 at 32 x 32 (a softmax output and an unquantized input are floats)
    assert (a.name, a.op, a.bits, a.macs, a.bops) == ("<model>:einsum", "einsum", (8, 4), 54, 54 * 8 * 4)
    assert (b.op, b.bits, b.macs) == ("matmul", (32, 32), 54)


def test_model_without_activation_products_has_no_sites():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    assert count_activation_products(m, (torch.randn(2, 3, 5, 5),)) == []


def test_activation_products_restore_modes_and_leave_no_flags():
    m = _Correlation()
    m.train()
    count_activation_products(m, (torch.randn(1, 1, 2, 5),) * 2)
    assert m.training and m.conv.training
    assert not any(hasattr(mod, "_prunq_act_skip") for mod in m.modules())


def test_uncalibrated_quantizer_marks_its_output_not_its_input():
    """Measured right after ``prepare``: an observing quantizer returns its input; only what goes on from
    the quantizer counts at its bits, the input's other users stay float."""
    m = _HandAttention()
    a, b = count_activation_products(m, (torch.randn(2, 3, 6),))
    assert (a.bits, b.bits) == ((8, 4), (32, 32))
    assert not m.qq.calibrated and not m.qq._observing
