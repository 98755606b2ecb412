"""Shared and tied weights are quantized once and consistently: convert equals fake-quant exactly."""

from __future__ import annotations

import copy

import torch
from torch import nn

import prunq
from prunq.quant.weight import weight_quantizer


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(self.embed(tokens))))


def test_tied_embedding_gets_the_same_quantizer_and_convert_equals_fake_quant():
    torch.manual_seed(0)
    m = TiedLM()
    prunq.prepare(m, prunq.QuantConfig(weight_bits=3, act_bits=8))
    assert weight_quantizer(m.embed) is weight_quantizer(m.head)
    tokens = torch.randint(0, 12, (4, 5))
    prunq.calibrate(m, [tokens])
    m.eval()
    assert torch.equal(m.embed.weight, m.head.weight)  # both users see Q(W)
    ref = m(tokens)
    conv = prunq.convert(copy.deepcopy(m))
    assert conv.embed.weight is conv.head.weight  # still one Parameter
    assert torch.equal(conv(tokens), ref)  # converted == fake-quant, exactly
    prunq.unprepare(m)
    assert weight_quantizer(m.embed) is None and weight_quantizer(m.head) is None


def test_a_shared_weight_quantized_differently_is_refused():
    import pytest

    from prunq.core.errors import PrunqError

    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    m = nn.Sequential(a, nn.ReLU(), b)
    with pytest.raises(PrunqError, match="shares its weight with another layer quantized differently"):
        prunq.prepare(m, prunq.QuantConfig(weight_bits=4, overrides={"2": {"weight_bits": 8}}))
