"""hls4ml end to end (issue 11 item 4): QONNX → hls4ml (Latency, io_parallel) → g++ C simulation.

One tiny Conv/Linear model (3 input channels, 80 % sparse, power-of-two w4a8) is compiled once (module
fixture, ~20-40 s of g++); the other tests only convert (no compile).
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.prune import masks as M
from prunq.quant import QuantConfig, calibrate, convert, prepare

pytest.importorskip("hls4ml")
pytest.importorskip("qonnx")

from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx

from prunq.export.hls import prepare_qonnx, to_hls
from prunq.export.qonnx import to_qonnx


class Tiny(nn.Module):
    """Conv(3→6) + ReLU + MaxPool + Linear(24→12) + ReLU + Linear(12→5): the digits CNN's ops, tiny."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 2 * 2, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def tiny(sparsity: float = 0.8, power_of_two: bool = True, seed: int = 0):
    """(converted model, calibration inputs)."""
    torch.manual_seed(seed)
    model = Tiny().eval()
    x = torch.rand(16, 3, 4, 4)
    for m in (model.conv, model.fc1, model.fc2):
        M.attach_mask(m)
        if sparsity:
            M.set_mask(m, (torch.rand_like(m.weight) >= sparsity).float())
    prepare(model, QuantConfig(weight_bits=4, act_bits=8, power_of_two=power_of_two))
    calibrate(model, [x])
    convert(model)
    return model.eval(), x


def qonnx_outputs(model, x):
    proto = ModelWrapper(to_qonnx(model, (x,)))
    return execute_onnx(proto, {proto.graph.input[0].name: x.numpy()})[proto.graph.output[0].name]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    model, x = tiny()
    return model, x, to_hls(model, (x,), tmp_path_factory.mktemp("hls") / "tiny")


@pytest.mark.slow
def test_csim_equals_qonnx(compiled):
    model, _, res = compiled
    torch.manual_seed(1)
    x = torch.rand(64, 3, 4, 4)
    y = res.predict(x.numpy())
    ref = qonnx_outputs(model, x).astype(np.float64)
    assert y.shape == ref.shape == (64, 5)
    # Every quantized activation is bit-identical (a one-step flip would move an output by >= a weight
    # step times an activation step, ~1e-3 here); what is left is the bias, held on a 2^-32 grid by hls4ml
    # and added in float32 by qonnx.
    assert np.abs(y - ref).max() <= 2.0**-28
    assert np.array_equal(y.astype(np.float32), ref.astype(np.float32))  # bit-exact at float32 (4.7e-10)
    assert np.array_equal(y.argmax(1), ref.argmax(1))
    with torch.no_grad():
        assert np.abs(y - model(x).numpy()).max() <= 1e-5


@pytest.mark.slow
def test_figures_are_hls4mls_own(compiled):
    model, _, res = compiled
    assert [r["name"] for r in res.layers] == ["conv", "fc1", "fc2"]
    assert [r["kind"] for r in res.layers] == ["Conv2D", "Dense", "Dense"]
    params = (res.out_dir / "firmware" / "parameters.h").read_text()
    written = [int(v) for v in re.findall(r"n_zeros = (\d+);", params)]
    for r, m in zip(res.layers, (model.conv, model.fc1, model.fc2)):
        zeros = int((m.weight == 0).sum())
        assert r["n_weights"] == m.weight.numel() and r["n_zeros"] == zeros and zeros in written
        assert r["multiplier_limit"] == m.weight.numel() - zeros  # reuse factor 1
        assert r["weight_bits"] == 4 and r["act_bits"] == 8 and r["bops"] > 0
        assert r["weight_precision"].startswith("fixed<") and r["result_precision"].startswith("fixed<")
    assert res.totals["multiplier_limit"] == sum(r["multiplier_limit"] for r in res.layers)
    assert res.timings["compile"] > 0


def test_multiplier_figure_drops_with_sparsity(tmp_path):
    sparse = to_hls(*tiny(0.8), tmp_path / "sparse", compile=False)
    dense = to_hls(*tiny(0.0), tmp_path / "dense", compile=False)
    s, d = sparse.totals, dense.totals
    assert s["n_weights"] == d["n_weights"] == 3 * 6 * 9 + 24 * 12 + 12 * 5
    assert s["n_zeros"] > d["n_zeros"]  # the dense model's zeros are 4-bit roundings to 0 only
    assert s["multiplier_limit"] == s["n_weights"] - s["n_zeros"]
    assert s["multiplier_limit"] < 0.35 * d["multiplier_limit"]
    with pytest.raises(PrunqError, match="not compiled"):
        sparse.predict(np.zeros((1, 3, 4, 4)))


def test_per_channel_linear_scales_are_made_uniform_exactly():
    """The digits IndexError: a Linear whose channels have different power-of-two steps."""
    model, x = tiny()
    proto = to_qonnx(model, (x[:1],))
    linear_scales = [
        ModelWrapper(proto).get_initializer(n.input[1])
        for n in proto.graph.node
        if n.op_type == "Quant" and ModelWrapper(proto).get_initializer(n.input[0]) is not None
    ]
    assert any(np.unique(s).size > 1 for s in linear_scales[1:])  # the case hls4ml 1.3.0 cannot fold
    w = prepare_qonnx(copy.deepcopy(proto))
    for n in w.graph.node:
        if n.op_type == "Quant" and w.get_initializer(n.input[0]) is not None:
            assert w.get_initializer(n.input[1]).size == 1
    a = execute_onnx(w, {w.graph.input[0].name: x[:1].numpy()})[w.graph.output[0].name]
    b = execute_onnx(ModelWrapper(proto), {proto.graph.input[0].name: x[:1].numpy()})[proto.graph.output[0].name]
    assert np.array_equal(a, b)


def test_non_power_of_two_steps_are_refused(tmp_path):
    model, x = tiny(power_of_two=False)
    with pytest.raises(PrunqError) as e:
        to_hls(model, (x,), tmp_path / "x", compile=False)
    msg = str(e.value)
    assert "\n" not in msg and "layer 'conv'" in msg and "quant.power_of_two: true" in msg
    assert msg.startswith("hls4ml: ") and "non-power-of-two weight step" in msg
    assert not (tmp_path / "x").exists()
