"""ONNX QDQ export (issue 11): ONNX Runtime runs it on fused integer kernels, close to prunq's outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.prune import masks as M
from prunq.quant import QuantConfig, calibrate, convert, find_conv_bn_pairs, fold_bn_, prepare

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from prunq.export.onnx_qdq import to_onnx_fp32, to_onnx_qdq


class ConvNet(nn.Module):
    """Conv + BN + ReLU + MaxPool + Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


class ResBlock(nn.Module):
    """A residual block (two conv+BN, identity shortcut) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = torch.relu(x + y)
        return self.fc(x.mean((2, 3)))


class UpNet(nn.Module):
    """Conv -> ConvTranspose (2x up) -> ReLU -> Conv."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1)
        self.out = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.up(torch.relu(self.down(x)))))


MODELS = {"convnet": ConvNet, "resblock": ResBlock, "upnet": UpNet}


def compressed(name: str, weight_bits: int = 4, act_bits: int = 8, sparsity: float = 0.5, exclude=(),
               inputs: tuple[torch.Tensor, ...] | None = None, batch: int = 4):  # fmt: skip
    """(converted model, example inputs): BN folded, random masks, quantized, calibrated, converted."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = inputs if inputs is not None else (torch.rand(batch, 3, 8, 8),)
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    fold_bn_(model, find_conv_bn_pairs(model, x))
    for _, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            M.attach_mask(m)
            M.set_mask(m, (torch.rand_like(m.weight) > sparsity).float())
    prepare(model, QuantConfig(weight_bits=weight_bits, act_bits=act_bits, exclude=list(exclude)))
    calibrate(model, [x])
    convert(model)
    return model.eval(), x


# -- running ---------------------------------------------------------------------------------------------
def run_ort(proto, inputs, optimize: bool = True, tmp_path=None):
    """(first output, op types of ORT's optimized graph or None)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    path = None
    if tmp_path is not None:
        path = str(tmp_path / "optimized.onnx")
        so.optimized_model_filepath = path
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})[0]
    ops = [n.op_type for n in onnx.load(path).graph.node] if path else None
    return out, ops


def reference(model, inputs):
    with torch.no_grad():
        return model(*inputs).numpy()


def one_step_bound(model) -> float:
    """One input step of the last layer on every input at once: |W_row|_1 * act_step (max over rows)."""
    last = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))][-1]
    w = last.weight.detach()
    if isinstance(last, nn.ConvTranspose2d):
        w = w.transpose(0, 1)
    return float(w.abs().reshape(w.shape[0], -1).sum(1).max() * last.input_quantizer.effective_step())


def gemm_bias_bound(model) -> float:
    """The int32 rounding of the last Linear's bias: act_step * max weight step / 2 (plus float slack)."""
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not fcs:
        return 1e-6
    fc = fcs[-1]
    return float(fc.input_quantizer.effective_step() * fc.weight_step.max()) / 2 + 1e-6


# -- tests -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_qdq_matches_prunq_and_fuses(name, tmp_path):
    model, x = compressed(name)
    ref = reference(model, x)
    proto = to_onnx_qdq(model, x)
    assert proto.ir_version <= 10 and onnx.checker.check_model(proto) is None
    exact, _ = run_ort(proto, x, optimize=False)  # the Q/DQ graph as written
    fused, ops = run_ort(proto, x, optimize=True, tmp_path=tmp_path)
    scale = float(np.abs(ref).max())
    # as written: float rounding plus the int32 rounding of the Linear's bias
    assert np.abs(exact - ref).max() <= gemm_bias_bound(model) + 1e-6 * scale
    assert np.abs(fused - ref).max() <= one_step_bound(model)
    assert "QLinearConv" in ops
    if name == "convnet":  # every layer fused: 2 QLinearConv + QGemm, no float Conv left
        assert ops.count("QLinearConv") == 2 and "QGemm" in ops and "Conv" not in ops and "FusedConv" not in ops


def test_weights_are_int8_on_their_grid_and_activations_uint8():
    model, x = compressed("convnet", weight_bits=4)
    proto = to_onnx_qdq(model, x)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    dq = [
        n
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8
    ]
    assert len(dq) == 3  # the three weights
    for n in dq:
        k = inits[n.input[0]]
        assert np.abs(k).max() <= 7 and inits[n.input[1]].ndim == 1  # 4-bit grid, per output channel
        assert next(a.i for a in n.attribute if a.name == "axis") == 0
    q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert q and all(inits[n.input[2]].dtype == np.uint8 and inits[n.input[2]] == 0 for n in q)


def test_sub8bit_and_signed_activations_are_clipped_exactly(tmp_path):
    x = (torch.rand(4, 3, 8, 8) - 0.5,)  # a signed input: uint8 with zero point 128, narrow grid
    model, x = compressed("convnet", weight_bits=4, act_bits=4, inputs=x)
    ref = reference(model, x)
    proto = to_onnx_qdq(model, x)
    assert sum(n.op_type == "Clip" for n in proto.graph.node) >= 3
    exact, _ = run_ort(proto, x, optimize=False)
    assert np.abs(exact - ref).max() <= gemm_bias_bound(model)
    fused, ops = run_ort(proto, x, tmp_path=tmp_path)
    assert ops.count("QLinearConv") == 2 and np.abs(fused - ref).max() <= one_step_bound(model)


def test_int4_initializers_take_half_the_bytes(tmp_path):
    model, x = compressed("convnet", weight_bits=4)
    p8, p4 = to_onnx_qdq(model, x), to_onnx_qdq(model, x, int4=True)
    assert p4.ir_version == 10 and next(o.version for o in p4.opset_import if o.domain == "") == 21

    def weight_bytes(p, dtype):  # the weights' integer initializers (zero points are 1 value per channel)
        return sum(
            len(t.raw_data) for t in p.graph.initializer if t.data_type == dtype and t.name.endswith("_quantized")
        )

    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    b8, b4 = weight_bytes(p8, onnx.TensorProto.INT8), weight_bytes(p4, onnx.TensorProto.INT4)
    assert b8 == n and b4 == sum(
        (m.weight.numel() + 1) // 2 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    assert len(p4.SerializeToString()) < len(p8.SerializeToString())
    o8, _ = run_ort(p8, x, optimize=False)
    o4, _ = run_ort(p4, x, optimize=False)  # the same values from INT4 containers
    assert np.abs(o4 - o8).max() <= 1e-6 * float(np.abs(o8).max())
    o4, ops = run_ort(p4, x, tmp_path=tmp_path)  # ORT does not fuse 4-bit weights: DQ + float Conv
    assert "QLinearConv" not in ops and np.abs(o4 - o8).max() <= one_step_bound(model)


def test_fp32_graph_is_the_float_network():
    model, x = compressed("resblock")
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if hasattr(m, "input_quantizer"):
            m.input_quantizer = nn.Identity()
    out, _ = run_ort(to_onnx_fp32(model, x), x)
    assert np.abs(out - reference(plain, x)).max() <= 1e-5
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in to_onnx_fp32(model, x).graph.node)


def test_unquantized_layer_is_a_one_line_error():
    model, x = compressed("convnet", exclude=["fc"])
    with pytest.raises(PrunqError, match=r"layer 'fc' has no weight quantizer") as e:
        to_onnx_qdq(model, x)
    assert "\n" not in str(e.value)
    proto = to_onnx_qdq(model, x, allow_float=True)  # or kept in float on request
    out, _ = run_ort(proto, x, optimize=False)
    assert np.abs(out - reference(model, x)).max() <= 1e-5


def test_unconverted_model_is_an_error():
    model = ConvNet().eval()
    x = (torch.rand(2, 3, 8, 8),)
    prepare(model, QuantConfig(weight_bits=4, act_bits=8))
    calibrate(model, [x])
    with pytest.raises(PrunqError, match="convert the model first"):
        to_onnx_qdq(model, x)


def _zoo(name):
    from prunq.tasks.classification.models import build

    torch.manual_seed(0)
    model = build(name, **({"width": 0.25} if name == "resnet20" else {})).eval()
    x = (torch.rand(4, *((1, 8, 8) if name == "digits_cnn" else (3, 16, 16))),)
    fold_bn_(model, find_conv_bn_pairs(model, x))
    prepare(model, QuantConfig(weight_bits=4, act_bits=8))
    calibrate(model, [x])
    return convert(model), x


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20"])
def test_zoo_models_fuse(name, tmp_path):
    model, x = _zoo(name)
    ref = reference(model, x)
    out, ops = run_ort(to_onnx_qdq(model, x), x, tmp_path=tmp_path)
    assert np.abs(out - ref).max() <= one_step_bound(model)
    if name == "digits_cnn":  # every layer on integer kernels (MaxPool/Flatten get the Q/DQ copy above them)
        assert ops.count("QLinearConv") == 3 and ops.count("QGemm") == 2 and "DequantizeLinear" not in ops
    else:  # convs whose output feeds a residual add stay float (prunq quantizes layer inputs only)
        assert ops.count("QLinearConv") == 9 and ops.count("QGemm") == 1
