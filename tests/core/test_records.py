"""Per-layer records are the single source of the cost model: bits come from the quantizers themselves."""

from __future__ import annotations

import torch
from torch import nn

import prunq
from prunq.core.qparams import QParams
from prunq.core.records import LayerRecord, layer_records
from prunq.cost.measure import measure
from prunq.prune.masks import attach_mask, set_mask


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))


def test_measure_right_after_prepare_reports_the_prepared_bits():
    m = _net()
    prunq.prepare(m, prunq.QuantConfig(weight_bits=2, act_bits=4, overrides={"3": {"weight_bits": 8}}))
    cost = measure(m, (torch.zeros(1, 1, 4, 4),))  # no bits passed: read from the quantizers
    assert [(lc.weight_bits, lc.act_bits) for lc in cost.layers] == [(2, 4), (8, 4)]
    # per-channel steps: 4 and 3 weight steps + 1 activation step each, 32-bit floats
    assert [lc.scale_bits for lc in cost.layers] == [32 * (4 + 1), 32 * (3 + 1)]


def test_records_carry_mask_and_qparams_and_survive_convert():
    m = _net()
    attach_mask(m[0])
    mask = torch.ones(4, 1, 3, 3)
    mask[1] = 0
    set_mask(m[0], mask)
    prunq.prepare(m, prunq.QuantConfig(weight_bits=4, act_bits=8, power_of_two=True))
    prunq.calibrate(m, [torch.rand(2, 1, 4, 4)])
    rec = layer_records(m)[0]
    assert rec.mask is not None and int(rec.mask.sum()) == 27 and rec.weight_bits == 4
    assert rec.weight_q.axis == 0 and rec.weight_q.num_steps == 4 and rec.weight_q.power_of_two
    assert rec.act_q.signed is False and rec.act_q.bits == 8  # rand input: unsigned
    before = measure(m, (torch.zeros(1, 1, 4, 4),))
    prunq.convert(m)
    after_rec = layer_records(m)[0]
    assert after_rec.weight_bits == 4 and after_rec.weight_q.power_of_two
    assert torch.equal(after_rec.weight_q.step, rec.weight_q.step)
    after = measure(m, (torch.zeros(1, 1, 4, 4),))
    assert after.bops == before.bops and after.memory_bits == before.memory_bits


class SwappedLinear(nn.Module):
    """A module swapped in for a Linear (as a sparse runtime would): not an nn.Linear, still measured."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("w", lin.weight.detach().clone())
        self.register_buffer("b", lin.bias.detach().clone())

    def forward(self, x):
        return x @ self.w.t() + self.b

    def prunq_record(self, name: str) -> LayerRecord:
        q = QParams(bits=4, step=torch.full((self.w.shape[0],), 0.1), axis=0)
        return LayerRecord(name, "SwappedLinear", self.w, None, q, None, self.b, id(self.w))


def test_a_swapped_module_is_still_measured():
    m = _net()
    ref = measure(m, (torch.zeros(1, 1, 4, 4),))
    m[3] = SwappedLinear(m[3])
    cost = measure(m, (torch.zeros(1, 1, 4, 4),))
    assert [lc.name for lc in cost.layers] == ["0", "3"]
    lc = cost.layer("3")
    assert lc.macs == ref.layer("3").macs == 48 and lc.weight_bits == 4
    assert lc.bops == 48 * 4 * 32


def test_a_shared_weight_is_stored_once():
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    m = nn.Sequential(a, b)
    cost = measure(m, (torch.zeros(1, 4),))
    assert cost.macs == 32 and cost.prunable_params == 16
    assert cost.memory_bits == 16 * 32


def test_a_shared_weight_keeps_each_users_own_bias():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    cost = measure(nn.Sequential(a, b), (torch.zeros(1, 4),))
    assert cost.params == 16 + 4 + 4  # one weight, two biases
    assert cost.memory_bits == 32 * (16 + 4 + 4)


def test_sparsity_after_convert_still_counts_prunable_layers_only():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    attach_mask(m[0])
    mask = torch.ones(8, 8)
    mask[:, :6] = 0
    set_mask(m[0], mask)  # layer 0 pruned to 75 %, layer 2 left alone (excluded)
    prunq.prepare(m, prunq.QuantConfig(weight_bits=8, act_bits=8))
    prunq.calibrate(m, [torch.rand(4, 8)])
    before = measure(m, (torch.zeros(1, 8),)).sparsity
    prunq.convert(m)
    assert before == measure(m, (torch.zeros(1, 8),)).sparsity == 0.75
