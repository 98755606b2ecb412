"""QONNX export (METHOD.md §7): standard ONNX ops plus ``Quant`` nodes, for qonnx, hls4ml and FINN.

:func:`to_qonnx` traces a **converted** model (``prunq.quant.convert`` / ``prunq.load(run, convert=True)``)
with torch's TorchScript exporter (see :mod:`prunq.export._onnx_graph`) and puts ``Quant`` nodes (domain
``qonnx.custom_op.general``; inputs ``x, scale, zeropt, bitwidth``; ``rounding_mode="ROUND"``) on

* every compressed layer's **weight**: the converted float weight (``k * step``) through a ``Quant`` with
  the per-output-channel step shaped to broadcast against the stored weight (``(Co,1,1,1)`` Conv,
  ``(1,Co,1,1)`` ConvTranspose, ``(Co,1)`` Linear; a grouped ConvTranspose gets a full-shape scale),
  ``signed=1, narrow=1``, zero point 0;
* every compressed layer's **input activation**: a per-tensor ``Quant`` with the activation step,
  ``signed=0, narrow=0`` (``0 … 2^b-1``) for an unsigned quantizer (after ReLU), else ``signed=1, narrow=1``.

then runs qonnx's cleanup (InferShapes, FoldConstants keeping Quant nodes, FoldTransposeIntoQuantInit,
GiveUniqueNodeNames, GiveReadableTensorNames, …) and stamps the lowest IR version the opset needs.

**Exact**: ``Quant`` computes ``clamp(round_half_even(x / scale)) * scale`` in float32, the same operations
prunq's quantizers do (``x / step``, ``round``, ``clamp``, ``* step``), so the grids and the rounding agree
bit for bit; the rest of the graph is the float network torch exports (same ops, but ONNX Runtime's
kernels may sum in another order): outputs agree with prunq's converted model up to float32 rounding
(``tests/export/test_qonnx.py`` measures it). **Not covered**: input shapes are fixed to the example
inputs'; layers with ``prunq_record`` (custom modules) and layers without a weight quantizer raise
:class:`~prunq.core.errors.PrunqError`; so does anything torch's TorchScript exporter cannot trace.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from prunq.export import _onnx_graph as G

QONNX_DOMAIN = "qonnx.custom_op.general"
WHAT = "qonnx"


def _quant_node(graph: Any, onnx: Any, x: str, out: str, scale: np.ndarray, bits: int, signed: bool, narrow: bool,
                prefix: str) -> None:  # fmt: skip
    s = G.add_initializer(graph, f"{prefix}_scale", scale.astype(np.float32))
    z = G.add_initializer(graph, f"{prefix}_zeropt", np.zeros((), dtype=np.float32))
    b = G.add_initializer(graph, f"{prefix}_bitwidth", np.array(float(bits), dtype=np.float32))
    node = onnx.helper.make_node(
        "Quant", [x, s, z, b], [out], name=f"{prefix}_Quant", domain=QONNX_DOMAIN,
        signed=int(signed), narrow=int(narrow), rounding_mode="ROUND",
    )  # fmt: skip
    graph.node.append(node)


def to_qonnx(model: nn.Module, example_inputs: Any, *, opset: int = 13, cleanup: bool = True) -> Any:
    """The QONNX graph of a converted prunq model, as an ``onnx.ModelProto`` (save with ``onnx.save``).

    Args:
        model: a converted model (every compressed layer's weight quantized; activation quantizers
            calibrated). Not modified.
        example_inputs: a tensor or a tuple of tensors, the model's positional inputs; the graph is
            traced at their shapes (batch size included).
        opset: the standard ONNX opset (≤ 20; 13 suits FINN and hls4ml).
        cleanup: run qonnx's cleanup transforms (shape inference, constant folding, readable names).

    Raises:
        PrunqError: one line naming the layer: a compressed layer without a weight quantizer, an
            unsupported layer type, an unconverted model, or a graph torch cannot export.
    """
    onnx = G._onnx()
    marked = G.export_marked(model, example_inputs, WHAT, opset, require_quantized="QONNX")
    proto = marked.model
    graph = proto.graph
    for use, n in enumerate(G.markers(graph, G.WEIGHT_MARK)):
        layer = marked.layers[G.attr(n, "index")]
        wq = layer.weight_q
        _, scale = G.weight_on_grid(graph, n, layer, WHAT)  # on the grid, else a clear error
        _quant_node(
            graph, onnx, n.input[0], n.output[0], scale, wq.bits, True, wq.narrow, f"{_safe(layer.name)}_w{use}"
        )
        graph.node.remove(n)
    for use, n in enumerate(G.markers(graph, G.ACT_MARK)):
        layer = marked.layers[G.attr(n, "index")]
        aq = layer.act_q
        scale = np.array(float(aq.step), dtype=np.float32)
        _quant_node(graph, onnx, n.input[0], n.output[0], scale, aq.bits, aq.signed, aq.signed and aq.narrow,
                    f"{_safe(layer.name)}_in{use}")  # fmt: skip
        graph.node.remove(n)
    G.sort_topologically(graph, WHAT)
    G.fold_constants(proto, keep=("Quant",))
    G.drop_domain(proto)
    G.set_opset(proto, QONNX_DOMAIN, 1)
    G.ensure_conv_attrs(graph, G.tensor_shapes(proto))
    G.stamp_ir(proto)
    if cleanup:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.util.cleanup import cleanup_model

        proto = cleanup_model(ModelWrapper(proto), preserve_qnt_ops=True).model
        G.ensure_conv_attrs(proto.graph, G.tensor_shapes(proto))
        G.stamp_ir(proto)
    return proto


def _safe(name: str) -> str:
    return name.replace(".", "_") or "layer"
