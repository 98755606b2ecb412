"""ONNX for ONNX Runtime (METHOD.md §7): a QuantizeLinear/DequantizeLinear graph ORT runs on integer kernels.

:func:`to_onnx_qdq` traces a **converted** model (see :mod:`prunq.export._onnx_graph`) and writes

* every compressed layer's **weight** as an integer initializer (``w / step``: int8 values on their
  narrower grid for sub-8-bit weights) and a ``DequantizeLinear`` with the per-output-channel steps
  (``axis`` = the output-channel axis of the stored weight: 0 for Conv / Gemm, 1 for ConvTranspose);
  with ``int4=True``, weights of ≤ 4 bits become **INT4** initializers (two per byte; opset 21, IR 10);
* every compressed layer's **input activation** as ``QuantizeLinear → DequantizeLinear`` (uint8, scale =
  the activation step): zero point 0 for an unsigned quantizer (after ReLU; prunq's 8-bit grid
  ``0 … 255`` *is* uint8), zero point 128 for a signed one (ORT's fast kernels take uint8 activations ×
  int8 weights). Where uint8 is wider than prunq's grid (unsigned below 8 bits: ``0 … 2^b-1``; signed:
  the narrow ``±(2^(b-1)-1)``), an integer ``Clip`` goes between the two (QCDQ, as qonnx's
  ``QuantToQCDQ`` writes): exact, and ORT still fuses both neighbours. The pair is also copied above a
  chain of single-reader MaxPool / Flatten / Reshape / Transpose / Squeeze / Unsqueeze (a quantizer
  commutes with them exactly), so ORT fuses the layer producing the chain's input too;
* the **bias** of a Gemm whose input is quantized as int32 with scale ``act_step * weight_step``
  (``DequantizeLinear``): ORT fuses a QDQ Gemm into ``QGemm`` only with an int32 bias. Conv and
  ConvTranspose keep their float bias (ORT quantizes it itself when it fuses a Conv).

ORT 1.31 (CPU) then fuses ``DQ → Conv → (Relu) → Q`` into ``QLinearConv`` and ``DQ → Gemm`` into ``QGemm``.
It does not fuse: a Conv whose output no quantizer reads (the last layer, a conv feeding a residual
add: prunq quantizes layer *inputs* only, so those outputs stay float and the conv runs as DQ + float
Conv), ConvTranspose (no QDQ fusion on the CPU provider), nor 4-bit weights (so the INT4 file is
smaller, not faster).

**Exact**: the Q/DQ graph, run as written (no fusion), computes prunq's converted model up to float
rounding and the Gemm bias rounding (≤ ½ · act_step · weight_step per output). **Not exact**: ORT's fused
integer kernels requantize in their own arithmetic, so outputs can differ from prunq's by about one
quantization step of the next layer's input; ``tests/export/test_onnx_qdq.py`` measures it.
:func:`to_onnx_fp32` writes the plain float network (quantizers dropped; weights as converted) for a
baseline.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from torch import nn

from prunq.core.errors import PrunqError
from prunq.core.records import INPUT_QUANTIZER
from prunq.export import _onnx_graph as G

WHAT = "onnx"
#: Opset of the int8 QDQ graph (per-axis DequantizeLinear needs 13), and of the INT4 graph.
OPSET = 13
OPSET_INT4 = 21


def _int4_bytes(k: np.ndarray) -> bytes:
    """INT4 packing (ONNX): two's-complement nibbles, the first element in the low 4 bits."""
    flat = (k.reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _add_int(graph: Any, onnx: Any, name: str, k: np.ndarray, int4: bool) -> str:
    if int4:
        t = onnx.helper.make_tensor(name, onnx.TensorProto.INT4, list(k.shape), _int4_bytes(k), raw=True)
        graph.initializer.append(t)
        return name
    return G.add_initializer(graph, name, k.astype(np.int8))


def _axis_of(scale: np.ndarray, layer: G.Layer) -> int | None:
    """The single axis the broadcast-shaped ``scale`` varies along (``None``: per tensor)."""
    axes = [d for d, n in enumerate(scale.shape) if n > 1]
    if not axes:
        return None
    if len(axes) > 1:
        raise PrunqError(
            f"{WHAT}: layer '{layer.name}': per-channel steps of a grouped ConvTranspose have no single axis; ONNX QDQ cannot express them"
        )
    return axes[0]


def _weight_dq(graph: Any, onnx: Any, n: Any, layer: G.Layer, use: int, int4: bool) -> tuple[np.ndarray, int | None]:
    """Replace weight marker ``n`` by ``DequantizeLinear(int weights)``; returns (1-D steps, axis)."""
    wq = layer.weight_q
    k, scale = G.weight_on_grid(graph, n, layer, WHAT)
    axis = _axis_of(scale, layer)
    out = n.output[0]
    readers = G.consumers(graph, out)
    if len(readers) == 1 and readers[0].op_type == "Transpose":  # Linear on a >2-D input: fold the transpose
        t = readers[0]
        perm = list(G.attr(t, "perm", list(range(k.ndim))[::-1]))
        k = k.transpose(perm)
        axis = None if axis is None else perm.index(axis)
        graph.node.remove(t)
        out = t.output[0]
    steps = scale.reshape(-1) if axis is not None else scale.reshape(())
    prefix = f"{_safe(layer.name)}_w{use}"
    small = int4 and wq.bits <= 4
    q = _add_int(graph, onnx, f"{prefix}_quantized", k, small)
    s = G.add_initializer(graph, f"{prefix}_scale", steps.astype(np.float32))
    zshape = steps.shape
    z = _add_int(graph, onnx, f"{prefix}_zero_point", np.zeros(zshape, dtype=np.int64), small)
    kw = {"axis": axis} if axis is not None else {}
    graph.node.append(
        onnx.helper.make_node("DequantizeLinear", [q, s, z], [out], name=f"{prefix}_DequantizeLinear", **kw)
    )
    graph.node.remove(n)
    return steps, axis


def _quantize_bias(graph: Any, onnx: Any, layer: G.Layer, node: Any, w_steps: np.ndarray, prefix: str) -> None:
    """Bias of a Gemm (an initializer) -> DQ(int32, act_step * weight_step): ORT fuses a QDQ Gemm into
    QGemm only with an int32 bias. (A Conv keeps its float bias: ORT quantizes it itself when it fuses,
    and the graph as written stays exact.)"""
    if node.op_type != "Gemm" or len(node.input) < 3 or layer.act_q is None:
        return
    init = G.initializer(graph, node.input[2])
    if init is None:
        return
    b = onnx.numpy_helper.to_array(init).astype(np.float64)
    if b.ndim != 1:
        return
    scale = (float(layer.act_q.step) * np.broadcast_to(w_steps.astype(np.float64), b.shape)).astype(np.float32)
    k = np.round(b / scale.astype(np.float64))
    if np.abs(k).max(initial=0) >= 2**31 - 1:
        return  # keep the float bias: ORT then runs this layer unfused
    q = G.add_initializer(graph, f"{prefix}_bias_quantized", k.astype(np.int32))
    s = G.add_initializer(graph, f"{prefix}_bias_scale", scale)
    z = G.add_initializer(graph, f"{prefix}_bias_zero_point", np.zeros(b.shape, dtype=np.int32))
    out = f"{prefix}_bias_dequantized"
    graph.node.append(
        onnx.helper.make_node("DequantizeLinear", [q, s, z], [out], name=f"{prefix}_bias_DequantizeLinear", axis=0)
    )
    node.input[2] = out


#: Ops a quantizer commutes with exactly (monotone or pure data movement, per element): the input's
#: Q/DQ pair is copied above a chain of them, so ORT also fuses the layer that produces the chain's input.
#: Zero point of a signed activation in its uint8 container (ORT's fast kernels are uint8 x int8).
SIGNED_ZERO_POINT = 128
COMMUTING = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


def _qdq_pair(graph: Any, onnx: Any, x: str, out: str, layer: G.Layer, prefix: str) -> None:
    """``x -> QuantizeLinear -> [Clip] -> DequantizeLinear -> out`` with the layer's activation grid (the
    integer Clip only where the 8-bit container is wider than the grid: QCDQ, as qonnx's QuantToQCDQ)."""
    aq = layer.act_q
    step = np.array(float(aq.step), dtype=np.float32)
    zp = SIGNED_ZERO_POINT if aq.signed else 0
    s = G.add_initializer(graph, f"{prefix}_scale", step)
    z = G.add_initializer(graph, f"{prefix}_zero_point", np.array(zp, dtype=np.uint8))
    q = f"{prefix}_quantized"
    graph.node.append(onnx.helper.make_node("QuantizeLinear", [x, s, z], [q], name=f"{prefix}_QuantizeLinear"))
    if aq.qmin + zp > 0 or aq.qmax + zp < 255:  # the container is wider than the grid: clip to it
        lo = G.add_initializer(graph, f"{prefix}_clip_min", np.array(aq.qmin + zp, dtype=np.uint8))
        hi = G.add_initializer(graph, f"{prefix}_clip_max", np.array(aq.qmax + zp, dtype=np.uint8))
        graph.node.append(onnx.helper.make_node("Clip", [q, lo, hi], [f"{prefix}_clipped"], name=f"{prefix}_Clip"))
        q = f"{prefix}_clipped"
    graph.node.append(onnx.helper.make_node("DequantizeLinear", [q, s, z], [out], name=f"{prefix}_DequantizeLinear"))


def _act_qdq(graph: Any, onnx: Any, n: Any, layer: G.Layer, use: int) -> None:
    prefix = f"{_safe(layer.name)}_in{use}"
    # the chain of commuting single-reader ops that feeds the marker
    producers = {o: p for p in graph.node for o in p.output}
    outputs = {o.name for o in graph.output}
    top, x = None, n.input[0]
    while True:
        p = producers.get(x)
        if p is None or p.op_type not in COMMUTING or p.domain not in ("", "ai.onnx") or x in outputs:
            break
        if len(G.consumers(graph, x)) != 1:
            break
        top, x = p, p.input[0]
    _qdq_pair(graph, onnx, n.input[0], n.output[0], layer, prefix)
    if top is not None and len(G.consumers(graph, x)) >= 1:
        # Q(op(x)) = op(Q(x)) for these ops: the copy above is exact, and lets ORT fuse x's producer
        _qdq_pair(graph, onnx, x, f"{prefix}_hoisted", layer, f"{prefix}_hoisted")
        top.input[0] = f"{prefix}_hoisted"
    graph.node.remove(n)


def _finish(proto: Any, opset: int) -> Any:
    onnx = G._onnx()
    graph = proto.graph
    G.sort_topologically(graph, WHAT)
    G.fold_constants(proto, keep=("QuantizeLinear", "DequantizeLinear"))
    G.drop_domain(proto)
    G.set_opset(proto, "", opset)
    G.ensure_conv_attrs(graph, G.tensor_shapes(proto))
    G.stamp_ir(proto)
    onnx.checker.check_model(proto)
    return proto


def to_onnx_qdq(model: nn.Module, example_inputs: Any, int4: bool = False, *, allow_float: bool = False) -> Any:
    """The ONNX QDQ graph of a converted prunq model for ONNX Runtime, as an ``onnx.ModelProto``.

    Args:
        model: a converted model (not modified).
        example_inputs: a tensor or a tuple of tensors; the graph is traced at their shapes.
        int4: store weights of ≤ 4 bits as INT4 initializers (opset 21, IR 10): half the bytes of int8;
            ORT runs them unfused (DequantizeLinear then float Conv), so this is for size, not speed.
        allow_float: keep compressed layers without a weight quantizer as float layers instead of raising.

    Raises:
        PrunqError: one line naming the layer (no weight quantizer, unsupported type, unconverted model,
            per-channel steps no single axis carries) or saying what torch could not export.
    """
    onnx = G._onnx()
    opset = G.TORCHSCRIPT_MAX_OPSET if int4 else OPSET
    marked = G.export_marked(model, example_inputs, WHAT, opset, None if allow_float else "ONNX QDQ export")
    proto = marked.model
    graph = proto.graph
    for use, n in enumerate(G.markers(graph, G.WEIGHT_MARK)):
        layer = marked.layers[G.attr(n, "index")]
        if layer.weight_q is None:
            G.rename_uses(graph, n.output[0], n.input[0])
            graph.node.remove(n)
            continue
        out = n.output[0]
        readers_before = G.consumers(graph, out)
        steps, _ = _weight_dq(graph, onnx, n, layer, use, int4)
        for r in readers_before:
            if r.op_type == "Transpose":
                continue
            _quantize_bias(graph, onnx, layer, r, steps, f"{_safe(layer.name)}_w{use}")
    for use, n in enumerate(G.markers(graph, G.ACT_MARK)):
        layer = marked.layers[G.attr(n, "index")]
        _act_qdq(graph, onnx, n, layer, use)
    return _finish(proto, OPSET_INT4 if int4 else OPSET)


def to_onnx_fp32(model: nn.Module, example_inputs: Any, *, opset: int = OPSET) -> Any:
    """The plain float ONNX graph of ``model`` (activation quantizers dropped, weights as they are), as an
    ``onnx.ModelProto``: the baseline the QDQ graph is measured against. Any model torch can trace."""
    plain = copy.deepcopy(model).eval()
    plain.requires_grad_(False)
    for m in plain.modules():
        if getattr(m, INPUT_QUANTIZER, None) is not None:
            setattr(m, INPUT_QUANTIZER, nn.Identity())
    proto = G.trace(plain, example_inputs, WHAT, opset)
    G.fold_constants(proto)
    G.drop_domain(proto)
    G.ensure_conv_attrs(proto.graph, G.tensor_shapes(proto))
    G.stamp_ir(proto)
    return proto


def _safe(name: str) -> str:
    return name.replace(".", "_") or "layer"
