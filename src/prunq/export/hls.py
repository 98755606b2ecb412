"""hls4ml end to end (issue 11 item 4): QONNX → hls4ml C++ (Latency, ``io_parallel``) → g++ C simulation.

:func:`to_hls` exports a converted prunq model with :func:`prunq.export.qonnx.to_qonnx`, prepares the
graph for hls4ml's QONNX frontend, converts it with ``hls4ml.converters.convert_from_onnx_model``
(Vitis/Vivado backend, writing C++ only — no vendor tool is run), compiles the C simulation with g++ and
returns an :class:`HlsResult`: ``predict`` for C simulation and **hls4ml's own figures** per layer (the
zero weights it sees, the multiplier limit it derives, the precisions it chose) beside prunq's BOPs.

**Preparation for hls4ml** (:func:`prepare_qonnx`), in this order:

1. qonnx's ``ConvertToChannelsLastAndClean``, ``GemmToMatMul``, ``cleanup_model`` — the recipe of
   hls4ml's QONNX documentation (``docs/frontend/qonnx.rst``).
2. **One scale per weight tensor.** hls4ml 1.3.0 folds a weight ``Quant`` into its constant only when
   the scale is one power of two for the whole tensor (``FuseQuantWithConstant``, ``quant_opt.py``).
   A per-channel scale becomes a ``Constant → ApplyAlpha(rescale)`` pair (``ConstQuantToConstAlpha``)
   whose rescale ``ScaleDownMatMul`` must then push below the ``MatMul``: it tries
   ``np.broadcast_to(scale, output.shape)`` with the scale broadcast to the full ``(n_in, n_out)``
   weight shape and the output shape ``(n_out,)``, which fails for any non-uniform per-column scale
   ("Failed to propagate quantization scales down MatMul node"). The ApplyAlpha stays between the
   constant and the MatMul, ``MatmulConstToDense`` no longer matches, and the orphan ``Constant``
   layer (no inputs) reaches ``InferPrecisionTypes.match``, whose ``node.get_input_variable()`` indexes
   ``self.inputs[0]`` of an empty list: **the IndexError** on ``Quant_N_param0``. (A Linear whose
   channels happen to share one step converts; the digits model's last Linear does not.) prunq's
   power-of-two per-channel steps ``s_c = 2^e_c`` make an exact rewrite possible: the weights
   ``k * s_c`` (``|k| <= 2^(b-1)-1``) are integers on the common grid ``s_min = 2^min(e)``, of at most
   ``b + max(e) - min(e)`` bits (narrow, signed). The weight ``Quant`` gets that scalar scale and
   bit width — an identity on the stored weights, checked — so every compressed layer becomes one
   hls4ml ``Dense``/``Conv2D`` with fixed-point constant weights and no ApplyAlpha layer (this is
   applied to Conv weights too: one code path, no per-pixel rescale layers). The price: hls4ml's
   declared ``weight_t`` is ``b + spread`` bits wide (reported as ``weight_precision``; the constant
   multiplicands are the same numbers, the extra bits are trailing zeros per channel).
3. **Precisions**: hls4ml infers the types of Quant-ed activations (``ufixed<b, ..., RND_CONV, SAT>``
   — round half to even, as QONNX's ``ROUND``), of weights and of accumulators/results of Dense/Conv;
   everything else (inputs, biases, ReLUs not followed by a Quant, pooling, transposes) gets the
   model's default precision, ``fixed<16,6>`` in hls4ml's examples, which truncates prunq's float32
   biases and intermediate values to 10 fractional bits (measured: 1 % output error on a random digits
   model). :data:`DEFAULT_PRECISION` (``fixed<48,16>``: 32 fractional bits, |x| < 2^15) is used
   instead, so those values are exact up to 2^-32.

**Exactness**: with power-of-two steps every product and partial sum is exact in both hls4ml's fixed
point and qonnx's float32; what differs is the bias (float32 in qonnx, truncated to 2^-32 here) and
float32 rounding of qonnx's sums. Quantized activations therefore agree bit for bit (barring a value
within 2^-32 of a rounding tie) and the C-simulation outputs, rounded to float32, equal
``execute_onnx``'s (``tests/export/test_hls.py``: all 64 rows, max |diff| 4.7e-10 before rounding).
On the 98 % w4a8 digits model: all 360 test images' logits equal at float32 (max |diff| 3.8e-7 on
logits up to 23.5 before rounding), top-1 identical.

**Refused** (one-line :class:`~prunq.core.errors.PrunqError`): a layer with a non-power-of-two weight or
activation step (hls4ml's ApplyAlpha path for those crashes or costs ~0.5 % output error, DEPLOY.md
§2.6); whatever :func:`~prunq.export.qonnx.to_qonnx` refuses.

**Figures** (per compressed layer, from hls4ml's layer objects — the same numbers its templates write
into ``firmware/parameters.h``): ``n_weights`` (``n_in * n_out`` of the multiply kernel), ``n_zeros``
(zero weights hls4ml sees), ``multiplier_limit = ceil(n_in*n_out / reuse) - n_zeros // reuse`` (the
C++ expression of ``core_templates.py`` / ``convolution_templates.py``); for a Conv in ``io_parallel``
this is per kernel instance (hls4ml's conv reuses it over ``n_partitions`` pixel groups).
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.export import _onnx_graph as G
from prunq.export.qonnx import to_qonnx

WHAT = "hls4ml"
#: hls4ml's default type for everything it does not infer (inputs, biases, unquantized intermediates).
DEFAULT_PRECISION = "fixed<48,16>"
#: The recipe field that makes every step a power of two (``prunq.quant.QuantConfig.power_of_two``).
POT_OPTION = "quant.power_of_two"


@dataclass
class HlsResult:
    """An hls4ml project written to ``out_dir`` (C++), its C simulation and hls4ml's figures.

    ``layers``: one dict per compressed layer, in graph order: ``name`` (prunq's layer), ``hls_name``,
    ``kind`` (``Dense``/``Conv2D``), ``n_weights``, ``n_zeros``, ``multiplier_limit``, ``reuse_factor``,
    ``weight_precision``, ``accum_precision``, ``result_precision``, and prunq's ``weight_bits``,
    ``act_bits``, ``bops``. ``totals``: the sums of ``n_weights``, ``n_zeros``, ``multiplier_limit`` and
    ``bops``. ``timings``: seconds for ``export`` (QONNX + preparation), ``convert`` (hls4ml), ``write``
    and ``compile`` (g++; 0 when not compiled).
    """

    out_dir: Path
    layers: list[dict[str, Any]]
    totals: dict[str, Any]
    timings: dict[str, float]
    hls_model: Any = field(repr=False)
    qonnx_model: Any = field(repr=False)  # the prepared qonnx ModelWrapper hls4ml converted
    input_shape: tuple[int, ...] = ()  # one sample, in the torch model's layout
    output_shape: tuple[int, ...] = ()  # one sample, as the QONNX graph's output
    compiled: bool = False

    def predict(self, x: np.ndarray) -> np.ndarray:
        """C simulation of a batch ``x`` of shape ``(N, *input_shape)`` (the torch model's layout);
        returns ``(N, *output_shape)`` as float64."""
        if not self.compiled:
            raise PrunqError(f"{WHAT}: the project was not compiled (to_hls(..., compile=True))")
        x = np.asarray(x, dtype=np.float64)
        if x.shape[1:] != self.input_shape:
            raise PrunqError(f"{WHAT}: predict expects inputs of shape (N, {self.input_shape}), got {x.shape}")
        # qonnx's channels-last conversion puts a Transpose(NCHW -> NHWC) behind a 4-d input; hls4ml keeps
        # it (checked with 3 channels) or drops it where it is a no-op in memory (1 channel): feed NCHW.
        flat = np.ascontiguousarray(x.reshape(len(x), -1))
        with contextlib.redirect_stdout(io.StringIO()):
            y = self.hls_model.predict(flat)
        return np.asarray(y, dtype=np.float64).reshape(len(x), *self.output_shape)


def check_power_of_two(model: nn.Module) -> None:
    """One-line PrunqError unless every compressed layer's weight and activation steps are powers of two."""
    for layer in G.collect_layers(model, WHAT):
        for kind, q in (("weight", layer.weight_q), ("activation", layer.act_q)):
            if q is None:
                continue
            step = q.step.detach().to(torch.float64).reshape(-1)
            mantissa, _ = torch.frexp(step)
            if not bool(torch.all((mantissa == 0.5) & (step > 0))):
                raise PrunqError(
                    f"{WHAT}: layer '{layer.name}' has a non-power-of-two {kind} step; compress with "
                    f"{POT_OPTION}: true (the hls4ml target needs it)"
                )


def prepare_qonnx(proto: Any) -> Any:
    """A QONNX ``ModelProto`` (from :func:`to_qonnx`) prepared for hls4ml's frontend, as a qonnx
    ``ModelWrapper``: channels-last, Gemm → MatMul, cleaned, one power-of-two scale per weight tensor
    (see the module docstring for why and why it is exact)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Could not absorb transpose->flatten", Gemm opset notes
        w = ModelWrapper(proto)
        w = cleanup_model(w)
        w = w.transform(ConvertToChannelsLastAndClean())
        w = w.transform(GemmToMatMul())
        w = cleanup_model(w)
    uniform_weight_scales(w)
    return w


def uniform_weight_scales(w: Any) -> None:
    """In place: every weight ``Quant`` (constant input) with per-channel power-of-two scales gets the
    smallest of them as its one scale and ``bits + spread`` as its bit width (an identity on the
    weights, checked; PrunqError otherwise)."""
    for node in w.graph.node:
        if node.op_type != "Quant":
            continue
        weight = w.get_initializer(node.input[0])
        if weight is None:
            continue
        scale = w.get_initializer(node.input[1])
        bits = w.get_initializer(node.input[3])
        if scale is None or bits is None:
            raise PrunqError(f"{WHAT}: weight Quant '{node.name}' has a non-constant scale or bit width")
        scale = np.asarray(scale, dtype=np.float64)
        if scale.size == 1 or np.all(scale == scale.reshape(-1)[0]):
            continue
        mantissa, exp = np.frexp(scale)
        if not np.all(mantissa == 0.5):
            raise PrunqError(f"{WHAT}: weight Quant '{node.name}' has a non-power-of-two scale")
        spread = int(exp.max() - exp.min())
        b = float(np.asarray(bits).reshape(-1)[0]) + spread
        s = float(scale.min())
        k = np.asarray(weight, dtype=np.float64) / s
        if not (np.array_equal(k, np.round(k)) and np.abs(k).max(initial=0) <= 2 ** (b - 1) - 1):
            raise PrunqError(f"{WHAT}: weight Quant '{node.name}': the weights are not on their power-of-two grid")
        w.set_initializer(node.input[1], np.array(s, dtype=np.float32))
        w.set_initializer(node.input[3], np.array(b, dtype=np.float32))


def _hls_config(hls4ml: Any, w: Any, backend: str, reuse_factor: int, strategy: str, default_precision: str) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = hls4ml.utils.config.config_from_onnx_model(
            w, granularity="name", backend=backend, default_precision=default_precision,
            default_reuse_factor=reuse_factor,
        )  # fmt: skip
    cfg["Model"]["Strategy"] = strategy
    for layer_cfg in cfg.get("LayerName", {}).values():
        if "Strategy" in layer_cfg:
            layer_cfg["Strategy"] = strategy
    return cfg


def _mult_figures(layer: Any) -> dict[str, Any] | None:
    """hls4ml's multiply-kernel figures of a Dense / Conv layer (what its templates write)."""
    cls = layer.class_name
    if cls == "Dense":
        n_in, n_out = int(layer.get_attr("n_in")), int(layer.get_attr("n_out"))
    elif cls in ("Conv1D", "Conv2D", "PointwiseConv1D", "PointwiseConv2D"):
        n_in = int(layer.get_attr("n_chan")) * int(layer.get_attr("filt_height", 1)) * int(layer.get_attr("filt_width"))
        n_out = int(layer.get_attr("n_filt"))
    else:
        return None
    wv = layer.get_weights("weight")
    rf = int(layer.get_attr("reuse_factor", 1))
    n_zeros = int(wv.nzeros)
    return {
        "hls_name": layer.name, "kind": cls, "n_weights": n_in * n_out, "n_zeros": n_zeros,
        "multiplier_limit": math.ceil(n_in * n_out / rf) - n_zeros // rf, "reuse_factor": rf,
        "n_partitions": int(layer.get_attr("n_partitions", 1)) if cls != "Dense" else 1,
        "weight_precision": str(layer.types["weight_t"].precision),
        "accum_precision": str(layer.types["accum_t"].precision),
        "result_precision": str(layer.types["result_t"].precision),
        "_values": np.sort(np.asarray(wv.data, dtype=np.float64).reshape(-1)),
    }  # fmt: skip


def _prunq_figures(model: nn.Module, example_inputs: tuple) -> dict[str, dict[str, Any]]:
    from prunq.core.records import layer_record
    from prunq.cost.measure import measure, record_quant

    layers = G.collect_layers(model, WHAT)
    quant = {layer.name: record_quant(layer_record(layer.name, layer.module)) for layer in layers}
    cost = measure(model, example_inputs, quant=quant)
    out = {}
    for layer in layers:
        lc = cost.layer(layer.name)
        weight = layer.module.weight.detach().to(torch.float64).reshape(-1).numpy()
        out[layer.name] = {
            "weight_bits": lc.weight_bits, "act_bits": lc.act_bits, "bops": float(lc.bops),
            "params": lc.params, "nonzeros": lc.nonzeros, "_values": np.sort(weight),
        }  # fmt: skip
    return out


def _match(hls_layers: list[dict[str, Any]], prunq: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Pair hls4ml's layers with prunq's by their weight values (the same numbers, other layouts)."""
    free = dict(prunq)
    rows = []
    for h in hls_layers:
        name = next(
            (n for n, p in free.items() if p["_values"].shape == h["_values"].shape
             and np.array_equal(p["_values"], h["_values"])),
            None,
        )  # fmt: skip
        p = free.pop(name) if name is not None else {}
        row = {"name": name if name is not None else h["hls_name"]}
        row.update({k: v for k, v in h.items() if not k.startswith("_")})
        row.update({k: p.get(k) for k in ("weight_bits", "act_bits", "bops")})
        rows.append(row)
    return rows


def to_hls(
    model: nn.Module,
    example_inputs: Any,
    out_dir: str | Path,
    *,
    reuse_factor: int = 1,
    strategy: str = "Latency",
    io_type: str = "io_parallel",
    part: str | None = None,
    backend: str = "Vitis",
    compile: bool = True,
    default_precision: str = DEFAULT_PRECISION,
) -> HlsResult:
    """Convert a converted prunq model to an hls4ml project in ``out_dir``, compile its C simulation.

    Args:
        model: a converted model (``prunq.quant.convert`` / ``prunq.load(run, convert=True)``) whose
            steps are all powers of two. Not modified.
        example_inputs: a tensor or tuple of tensors; the first sample fixes the shapes (batch 1).
        out_dir: where hls4ml writes the C++ project (``firmware/parameters.h`` etc.).
        reuse_factor, strategy, io_type, part, backend: hls4ml's options (``part=None``: its default).
        compile: build the C simulation with g++ (tens of seconds); ``False`` writes the project only
            (the figures do not need it).
        default_precision: hls4ml's type for what it does not infer (see the module docstring).

    Raises:
        PrunqError: one line: a non-power-of-two step (naming the layer and ``quant.power_of_two``),
            what :func:`to_qonnx` refuses, or hls4ml failing to convert / compile.
    """
    try:
        import hls4ml
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise PrunqError("hls4ml export needs the 'hls4ml' extra: pip install 'prunq[hls4ml]'") from e
    check_power_of_two(model)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if len(inputs) != 1:
        raise PrunqError(f"{WHAT}: only single-input models are supported, got {len(inputs)} inputs")
    one = (inputs[0][:1].detach().to(torch.float32).cpu(),)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    w = prepare_qonnx(to_qonnx(model, one))
    t1 = time.perf_counter()
    cfg = _hls_config(hls4ml, w, backend, reuse_factor, strategy, default_precision)
    kwargs = {"part": part} if part is not None else {}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            hls_model = hls4ml.converters.convert_from_onnx_model(
                w, hls_config=cfg, output_dir=str(out_dir), backend=backend, io_type=io_type, **kwargs
            )
    except Exception as e:
        raise PrunqError(f"{WHAT}: hls4ml could not convert the model: {type(e).__name__}: {_first(e)}") from e
    t2 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        hls_model.write()
    t3 = time.perf_counter()
    if compile:
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                hls_model._compile()  # write() already done: compile() = write() + _compile()
        except Exception as e:
            tail = buf.getvalue().strip().splitlines()[-1:] or [""]
            raise PrunqError(f"{WHAT}: g++ failed on the generated C++: {_first(e)} {tail[0]}".strip()) from e
    t4 = time.perf_counter()
    hls_layers = [f for f in (_mult_figures(layer) for layer in hls_model.get_layers()) if f is not None]
    layers = _match(hls_layers, _prunq_figures(model, one))
    totals = {
        k: sum(r[k] for r in layers if r.get(k) is not None)
        for k in ("n_weights", "n_zeros", "multiplier_limit", "bops")
    }
    out_shape = tuple(w.get_tensor_shape(w.graph.output[0].name))[1:]
    return HlsResult(
        out_dir=out_dir, layers=layers, totals=totals,
        timings={"export": t1 - t0, "convert": t2 - t1, "write": t3 - t2, "compile": t4 - t3},
        hls_model=hls_model, qonnx_model=w, input_shape=tuple(one[0].shape[1:]), output_shape=out_shape,
        compiled=compile,
    )  # fmt: skip


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
