"""QONNX export (issue 11): qonnx's executor reproduces prunq's converted model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunq.core.errors import PrunqError

pytest.importorskip("onnxruntime")
pytest.importorskip("qonnx")

from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx

from prunq.export.qonnx import QONNX_DOMAIN, to_qonnx
from tests.export.test_onnx_qdq import MODELS, compressed, reference


def execute(proto, inputs):
    wrapper = ModelWrapper(proto)
    feed = {i.name: x.numpy() for i, x in zip(proto.graph.input, inputs)}
    return execute_onnx(wrapper, feed)[proto.graph.output[0].name]


def quant_nodes(proto):
    w = ModelWrapper(proto)
    out = []
    for n in proto.graph.node:
        if n.op_type == "Quant":
            attrs = {a.name: (a.i if a.type == a.INT else a.s.decode()) for a in n.attribute}
            scale, bits = w.get_initializer(n.input[1]), w.get_initializer(n.input[3])
            weight = w.get_initializer(n.input[0])
            out.append((attrs, scale, float(bits.reshape(-1)[0]), weight))
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_qonnx_executes_like_prunq(name):
    model, x = compressed(name)
    proto = to_qonnx(model, x)
    ref = reference(model, x)
    out = execute(proto, x)
    # the same grids and rounding; the float ops may sum in another order
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))
    assert proto.ir_version <= 10
    assert any(o.domain == QONNX_DOMAIN for o in proto.opset_import)
    n_layers = sum(1 for m in model.modules() if hasattr(m, "weight_step"))
    qs = quant_nodes(proto)
    weights = [q for q in qs if q[3] is not None]
    acts = [q for q in qs if q[3] is None]
    assert len(weights) == n_layers and len(acts) == n_layers
    for attrs, scale, bits, w in weights:  # per output channel, narrow, signed, on the grid
        assert attrs == {"signed": 1, "narrow": 1, "rounding_mode": "ROUND"} and bits == 4.0
        assert (
            scale.ndim == w.ndim and max(scale.shape) > 1 and scale.size == max(scale.shape)  # one channel axis
        )
        k = np.round(w / scale)
        assert np.array_equal((k * scale).astype(np.float32), w) and np.abs(k).max() <= 7
    for attrs, scale, bits, _ in acts:  # per tensor; inputs in [0, 1] and after ReLU: unsigned
        assert scale.size == 1 and bits == 8.0 and attrs["signed"] == 0 and attrs["narrow"] == 0


def test_layouts_and_explicit_conv_attributes():
    model, x = compressed("upnet")
    proto = to_qonnx(model, x)
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert len(convs) == 3
    for n in convs:
        assert {"kernel_shape", "strides", "pads", "dilations", "group"} <= {a.name for a in n.attribute}
    shapes = {tuple(q[1].shape) for q in quant_nodes(proto) if q[3] is not None}
    assert shapes == {(6, 1, 1, 1), (1, 4, 1, 1), (2, 1, 1, 1)}  # Conv: (Co,1,1,1); ConvTranspose: (1,Co,1,1)


def test_signed_input_gets_a_signed_narrow_quant():
    model, x = compressed("convnet", act_bits=4, inputs=(torch.rand(4, 3, 8, 8) - 0.5,))
    proto = to_qonnx(model, x)
    first = next(q for q in quant_nodes(proto) if q[3] is None and q[0]["signed"] == 1)
    assert first[0]["narrow"] == 1 and first[2] == 4.0
    ref = reference(model, x)
    assert np.abs(execute(proto, x) - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_stereo_net_exports_and_executes():
    from prunq.quant import QuantConfig, calibrate, convert, find_conv_bn_pairs, fold_bn_, prepare
    from prunq.tasks.stereo.models import StereoNet

    model = StereoNet(width=0.5, max_disp=16, groups=4).eval()
    x = (torch.rand(1, 3, 16, 32), torch.rand(1, 3, 16, 32))
    fold_bn_(model, find_conv_bn_pairs(model, x))
    prepare(model, QuantConfig(weight_bits=4, act_bits=8))
    calibrate(model, [x])
    convert(model)
    proto = to_qonnx(model, x)
    ops = {n.op_type for n in proto.graph.node}
    assert {"ConvTranspose", "Softmax", "Resize", "Quant"} <= ops
    ref = reference(model, x)
    assert np.abs(execute(proto, x) - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_unquantized_layer_is_a_one_line_error():
    model, x = compressed("convnet", exclude=["fc"])
    with pytest.raises(
        PrunqError,
        match=r"^qonnx: layer 'fc' has no weight quantizer \(QONNX needs every compressed layer quantized\)$",
    ):
        to_qonnx(model, x)


def test_unconverted_and_unsupported_models_are_errors():
    from prunq.quant import QuantConfig, calibrate, prepare

    model = MODELS["convnet"]().eval()
    x = (torch.rand(2, 3, 8, 8),)
    prepare(model, QuantConfig(weight_bits=4, act_bits=8))
    calibrate(model, [x])
    with pytest.raises(PrunqError, match="layer 'conv' still has fake-quant"):
        to_qonnx(model, x)
    with pytest.raises(PrunqError, match="no compressed layers"):
        to_qonnx(torch.nn.Sequential(torch.nn.ReLU()), x)
