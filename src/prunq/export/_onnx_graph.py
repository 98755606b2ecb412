"""Shared plumbing of the ONNX exporters: a converted prunq model as a float ONNX graph with markers.

torch's exporters refuse sub-8-bit fake quantization, so the exporters trace a *copy* of the converted
model in which every compressed layer's weight passes through a marker (a parametrization) and every
input activation quantizer is replaced by a marker; torch's TorchScript exporter (``dynamo=False``)
writes each marker as a node of the private domain ``prunq`` (``WeightMark`` / ``ActMark``, attribute
``index`` = the layer's position in :attr:`MarkedGraph.layers`). The exporters then replace the
markers by what their format needs (``Quant`` nodes, Q/DQ pairs, or nothing) and drop the domain.

The graph is traced at the example inputs' shapes (static shapes: what qonnx and hls4ml want).
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from prunq.core.errors import PrunqError
from prunq.core.layers import from_canonical, is_compressible
from prunq.core.qparams import QParams
from prunq.core.records import INPUT_QUANTIZER, LayerRecord, layer_record, recorded_layers

DOMAIN = "prunq"
WEIGHT_MARK = "WeightMark"
ACT_MARK = "ActMark"
#: The highest opset torch's TorchScript exporter writes.
TORCHSCRIPT_MAX_OPSET = 20


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise PrunqError(
            "onnx export needs the 'export' extra: pip install 'prunq[export]' (onnx, onnxruntime, qonnx)"
        ) from e
    return onnx


# -- markers -------------------------------------------------------------------------------------------
class _MarkFn(torch.autograd.Function):
    """Identity in torch; one ``prunq::<kind>`` node in the ONNX graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kind: str, index: int) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, kind: str, index: int) -> Any:
        out = g.op(f"{DOMAIN}::{kind}", x, index_i=index)
        out.setType(x.type())
        return out


class _Marker(nn.Module):
    """Marks a layer's weight (a parametrization) or its input (in place of its input quantizer)."""

    def __init__(self, kind: str, index: int) -> None:
        super().__init__()
        self.kind, self.index = kind, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MarkFn.apply(x, self.kind, self.index)


# -- the layers ----------------------------------------------------------------------------------------
@dataclass
class Layer:
    """One compressed layer of the exported model."""

    name: str
    module: nn.Module
    record: LayerRecord

    @property
    def weight_q(self) -> QParams | None:
        return self.record.weight_q

    @property
    def act_q(self) -> QParams | None:
        return self.record.act_q

    def weight_scale(self, what: str) -> np.ndarray:
        """The weight steps in the module's *stored* layout, shaped to broadcast against the stored weight
        (``(Co, 1, 1, 1)`` for Conv, ``(1, Co, 1, 1)`` for ConvTranspose, ``(Co, 1)`` for Linear; the full
        weight shape for a grouped ConvTranspose, where no single axis carries the output channel)."""
        wq = self.weight_q
        assert wq is not None
        shape = tuple(self.record.weight.shape)  # canonical
        step = wq.step.detach().to(torch.float32).reshape(-1)
        if step.numel() == 1:
            return step.reshape([1] * len(shape)).numpy()
        if step.numel() != shape[0]:
            raise PrunqError(
                f"{what}: layer '{self.name}' has {step.numel()} weight steps for {shape[0]} output channels"
            )
        full = from_canonical(step.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).contiguous(), self.module)
        for axis in range(full.dim()):
            reduced = full.amax(dim=[d for d in range(full.dim()) if d != axis], keepdim=True)
            if torch.equal(reduced.expand_as(full), full):
                return reduced.numpy()
        return full.numpy()


@dataclass
class MarkedGraph:
    """The traced float graph (with marker nodes) and the layers its marker indices refer to."""

    model: Any  # onnx.ModelProto
    layers: list[Layer]


def collect_layers(model: nn.Module, what: str) -> list[Layer]:
    """The compressed layers of a *converted* model, checked to be exportable (else a one-line PrunqError)."""
    layers = []
    for name, module in recorded_layers(model):
        if not is_compressible(module):
            raise PrunqError(
                f"{what}: layer '{name}' ({type(module).__name__}) is not a layer type the exporter supports"
            )
        if parametrize.is_parametrized(module, "weight"):
            raise PrunqError(
                f"{what}: layer '{name}' still has fake-quant/mask parametrizations; convert the model first (prunq.quant.convert or prunq.load(run, convert=True))"
            )
        aq = getattr(module, INPUT_QUANTIZER, None)
        if aq is not None and not bool(getattr(aq, "calibrated", True)):
            raise PrunqError(f"{what}: layer '{name}' has an uncalibrated input quantizer")
        layers.append(Layer(name, module, layer_record(name, module)))
    if not layers:
        raise PrunqError(f"{what}: the model has no compressed layers (Conv, ConvTranspose, Linear)")
    return layers


def export_marked(
    model: nn.Module, example_inputs: Any, what: str, opset: int = 13, require_quantized: str | None = None
) -> MarkedGraph:
    """Trace a marked copy of ``model`` (left untouched) to ONNX at ``opset`` (≤ 20). ``require_quantized``
    (the format's name): every compressed layer must have a weight quantizer."""
    if opset > TORCHSCRIPT_MAX_OPSET:
        raise PrunqError(f"{what}: opset {opset} is above what torch's exporter writes ({TORCHSCRIPT_MAX_OPSET})")
    layers = collect_layers(model, what)
    if require_quantized:
        require_weight_quantizers(layers, what, require_quantized)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    marked = copy.deepcopy(model).eval()
    marked.requires_grad_(False)
    modules = dict(marked.named_modules())
    for i, layer in enumerate(layers):
        m = modules[layer.name]
        parametrize.register_parametrization(m, "weight", _Marker(WEIGHT_MARK, i), unsafe=True)
        if getattr(m, INPUT_QUANTIZER, None) is not None:
            setattr(m, INPUT_QUANTIZER, _Marker(ACT_MARK, i))
    proto = trace(marked, inputs, what, opset)
    check_unique_markers(proto.graph, what)
    return MarkedGraph(proto, layers)


def trace(model: nn.Module, example_inputs: Any, what: str, opset: int) -> Any:
    """``model`` (not copied) traced by torch's TorchScript exporter, as an ``onnx.ModelProto``."""
    onnx = _onnx()
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    f = io.BytesIO()
    names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, inputs, f, dynamo=False, opset_version=opset, do_constant_folding=True,
                custom_opsets={DOMAIN: 1}, input_names=names, training=torch.onnx.TrainingMode.EVAL,
            )  # fmt: skip
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrunqError(f"{what}: torch's ONNX exporter failed on this model: {first}") from e
    return onnx.load_from_string(f.getvalue())


# -- graph editing -------------------------------------------------------------------------------------
def attr(node: Any, name: str, default: Any = None) -> Any:
    """A node attribute's python value."""
    onnx = _onnx()
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def markers(graph: Any, kind: str) -> list[Any]:
    """The marker nodes of ``kind`` (``WeightMark`` / ``ActMark``)."""
    return [n for n in graph.node if n.domain == DOMAIN and n.op_type == kind]


def consumers(graph: Any, tensor: str) -> list[Any]:
    """Nodes reading ``tensor``."""
    return [n for n in graph.node if tensor in n.input]


def rename_uses(graph: Any, old: str, new: str) -> None:
    """Every reader of ``old`` (nodes and graph outputs) reads ``new`` instead."""
    for n in graph.node:
        for k, name in enumerate(n.input):
            if name == old:
                n.input[k] = new
    for o in graph.output:
        if o.name == old:
            o.name = new


def initializer(graph: Any, name: str) -> Any | None:
    """The initializer called ``name``, or ``None``."""
    for t in graph.initializer:
        if t.name == name:
            return t
    return None


def weight_on_grid(graph: Any, node: Any, layer: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(integer weights, broadcast-shaped steps)`` of a weight marker's constant input: a weight that is
    not a constant of the traced graph, or is off its grid, is a one-line error."""
    onnx = _onnx()
    init = initializer(graph, node.input[0])
    if init is None:
        raise PrunqError(f"{what}: layer '{layer.name}': its weight is not a constant of the traced graph")
    w = onnx.numpy_helper.to_array(init).astype(np.float32)
    scale = layer.weight_scale(what)
    return weight_ints(layer, w, scale, what), scale


def require_weight_quantizers(layers: list, what: str, needs: str) -> None:
    """A compressed layer without a weight quantizer is a one-line error naming it."""
    for layer in layers:
        if layer.weight_q is None:
            raise PrunqError(f"{what}: layer '{layer.name}' has no weight quantizer ({needs} needs every compressed layer quantized)")


def add_initializer(graph: Any, name: str, array: np.ndarray, dtype: int | None = None) -> str:
    """Add ``array`` as an initializer (``dtype``: an ONNX TensorProto type for 4-bit ints); returns ``name``."""
    onnx = _onnx()
    if dtype is None:
        t = onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)
    else:
        t = onnx.helper.make_tensor(name, dtype, list(array.shape), np.asarray(array).reshape(-1).tolist())
    graph.initializer.append(t)
    return name


def remove_unused_initializers(graph: Any) -> None:
    """Drop initializers no node reads."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def drop_domain(model: Any, domain: str = DOMAIN) -> None:
    """Remove ``domain`` from the model's opset imports (after every node of it is gone)."""
    keep = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def set_opset(model: Any, domain: str, version: int) -> None:
    """Import ``domain`` at ``version`` (replacing an existing import)."""
    onnx = _onnx()
    drop_domain(model, domain)
    model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def stamp_ir(model: Any) -> None:
    """Stamp the lowest IR version the model's opsets need (ORT 1.31 and qonnx refuse onnx 1.23's IR 14)."""
    onnx = _onnx()
    std = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    model.ir_version = max(7, onnx.helper.find_min_ir_version_for(std, ignore_unknown=True))


def ensure_conv_attrs(graph: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    """Give every Conv / ConvTranspose explicit ``kernel_shape``, ``strides``, ``pads``, ``dilations``, ``group``."""
    onnx = _onnx()
    for n in graph.node:
        if n.op_type not in ("Conv", "ConvTranspose") or n.domain not in ("", "ai.onnx"):
            continue
        have = {a.name for a in n.attribute}
        wshape = shapes.get(n.input[1])
        k = list(wshape[2:]) if wshape is not None else attr(n, "kernel_shape")
        if k is None:
            raise PrunqError(f"onnx: node {n.name} has no kernel_shape and an unknown weight shape")
        d = len(k)
        defaults = {"kernel_shape": k, "strides": [1] * d, "dilations": [1] * d, "pads": [0] * (2 * d), "group": 1}
        for name, value in defaults.items():
            if name not in have:
                n.attribute.append(onnx.helper.make_attribute(name, value))


def tensor_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Static shapes of the model's tensors (shape inference), where known."""
    onnx = _onnx()
    plain = type(model)()
    plain.CopyFrom(model)
    for n in plain.graph.node:  # markers and Quant nodes keep their input's shape: Identity for inference
        if n.domain not in ("", "ai.onnx"):
            x = n.input[0]
            del n.input[:]
            del n.attribute[:]
            n.input.append(x)
            n.op_type, n.domain = "Identity", ""
    inferred = onnx.shape_inference.infer_shapes(plain)
    out: dict[str, tuple[int, ...]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(x.HasField("dim_value") for x in dims):
            out[vi.name] = tuple(x.dim_value for x in dims)
    for t in model.graph.initializer:
        out[t.name] = tuple(t.dims)
    return out


def weight_ints(layer: Layer, w: np.ndarray, scale: np.ndarray, what: str) -> np.ndarray:
    """The integers of a converted weight (``w / scale``), checked to lie on the grid."""
    wq = layer.weight_q
    assert wq is not None
    k = np.round(w / scale)
    if (
        not np.array_equal((k * scale).astype(np.float32), w)
        or k.min(initial=0) < wq.qmin
        or k.max(initial=0) > wq.qmax
    ):
        raise PrunqError(
            f"{what}: layer '{layer.name}': weights are not on their quantization grid (convert the model first)"
        )
    return k.astype(np.int64)


def check_unique_markers(graph: Any, what: str) -> None:
    """Every marker must read a tensor (the exporter wrote one per use of a layer)."""
    for n in graph.node:
        if n.domain == DOMAIN and len(n.input) != 1:
            raise PrunqError(f"{what}: unexpected marker node {n.name}")


def sort_topologically(graph: Any, what: str) -> None:
    """Order ``graph``'s nodes so every input is produced before it is read (nodes were appended)."""
    produced = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:
            raise PrunqError(f"{what}: the exported graph has a cycle or a dangling input")
        for n in ready:
            ordered.append(n)
            produced.update(n.output)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def fold_constants(model: Any, keep: tuple[str, ...] = ()) -> None:
    """One pass of constant folding (``Constant`` nodes become initializers; standard-domain nodes whose
    inputs are all constant are evaluated with onnx's reference implementation), except ``keep`` op types.

    qonnx's own FoldConstants re-infers every shape after each folded node: minutes on a traced graph
    with a few hundred shape-arithmetic nodes; this does the same work once.
    """
    for _ in range(16):  # folding a Shape node can make the next shapes static: repeat until nothing folds
        if not _fold_once(model, keep):
            break


def _fold_once(model: Any, keep: tuple[str, ...]) -> bool:
    onnx = _onnx()
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    shapes = tensor_shapes(model) if any(n.op_type == "Shape" for n in graph.node) else {}
    folded = False
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    kept = []
    for n in graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type in keep:
            kept.append(n)
            continue
        if n.op_type == "Constant":
            value = onnx.numpy_helper.to_array(onnx.helper.get_attribute_value(n.attribute[0])) if n.attribute else None
            if value is None or n.attribute[0].name != "value":
                kept.append(n)
                continue
            outs = [value]
        elif n.op_type == "Shape" and n.input[0] in shapes:
            dims = np.array(shapes[n.input[0]], dtype=np.int64)
            start, end = attr(n, "start", 0), attr(n, "end", None)
            outs = [dims[start:end]]
        elif n.input and all(i == "" or i in consts for i in n.input):
            one = onnx.helper.make_model(
                onnx.helper.make_graph(
                    [n], "fold", [], [onnx.helper.make_tensor_value_info(o, 0, None) for o in n.output]
                ),
                opset_imports=[onnx.helper.make_opsetid("", opset)],
            )
            try:
                outs = ReferenceEvaluator(one).run(None, {i: consts[i] for i in n.input if i})
            except Exception:  # noqa: BLE001 - not foldable here: leave it to the runtime
                kept.append(n)
                continue
        else:
            kept.append(n)
            continue
        for name, value in zip(n.output, outs):
            value = np.asarray(value)
            consts[name] = value
            graph.initializer.append(onnx.numpy_helper.from_array(value, name))
        folded = True
    del graph.node[:]
    graph.node.extend(kept)
    remove_unused_initializers(graph)
    stale = {t.name for t in graph.initializer}
    keep_vi = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    return folded
