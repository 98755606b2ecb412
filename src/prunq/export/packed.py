"""The packed file (METHOD.md §7): a compressed model stored at the size the cost model claims.

A safetensors container with one ``uint8`` tensor, ``packed``, and one metadata entry, ``prunq_packed``
(JSON: the format, the model's origin and the run's structural transforms). The tensor is a bit stream
(LSB first, fields back to back, zero-padded to a byte once at the end):

* per recorded layer, in the model's order (:func:`prunq.core.records.layer_records`):

  - a header of :data:`LAYER_HEADER_BITS` (72) bits: flags, weight and activation bits, the position
    encoding and its ``r``, quantizer flags (8 bits each), and the number of stored values (32 bits);
  - the **values**: each non-zero weight as a ``b_w``-bit two's-complement integer (the weight over its
    channel's step; an unquantized weight: its float32 bits). The ``dense`` encoding stores all ``N``
    values, ``relative`` also its filler zeros;
  - the **positions**, in the encoding the cost model chose for the layer (:func:`~prunq.cost.measure.
    choose_encoding`): ``bitmap`` one bit per weight; ``csr`` a ``ceil(log2 cols)``-bit column per value,
    then ``rows + 1`` row pointers of ``ceil(log2(nz + 1))`` bits; ``relative`` an ``r``-bit gap per value;
  - the **steps**: one per weight channel, then the input activation's; 8-bit exponents when every step of
    the layer is a power of two, else float32;
  - the **bias** as float32;

* then every other entry of the converted model's state dict, raw, in state-dict order (parameters outside
  the compressed layers — the cost model's ``other_bits`` — and buffers such as unfolded batch-norm
  statistics, which the cost model does not count).

So, per layer, the payload is exactly the cost model's ``memory_bits`` (a property test checks it); the
file adds 72 bits per layer, the other state, the JSON and safetensors' own header, and at most 7 bits of
padding. :func:`read_packed` rebuilds the converted model (``prunq.load(run, convert=True)``) bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from prunq.core.errors import PrunqError
from prunq.core.layers import from_canonical
from prunq.core.records import (
    CONVERTED_BITS, CONVERTED_STEP, INPUT_QUANTIZER, LayerRecord, layer_records, recorded_layers,
)  # fmt: skip
from prunq.cost.encodings import ENCODINGS, FLOAT_BITS
from prunq.cost.measure import choose_encoding, record_quant

FORMAT = 1
META_KEY = "prunq_packed"
TENSOR = "packed"
#: Bits of each layer's header in the stream (the constant the file adds per layer).
LAYER_HEADER_BITS = 72
#: Transforms of a run the packed file keeps (replayed before the layers are filled); the masks, the
#: quantizers and the conversion are what the stream itself describes.
STRUCTURAL = ("decompose_attention", "fold_bn", "remove_channels")
DESCRIBED = ("mask", "quantize", "quantize_config", "convert")

# header flags
_PRUNED, _WQ, _WQ_AXIS, _AQ, _AQ_SIGNED, _BIAS, _POW2 = (1 << i for i in range(7))
_WQ_SIGNED, _WQ_NARROW, _WQ_POW2, _AQ_NARROW, _AQ_POW2 = (1 << i for i in range(5))


# -- bit streams ---------------------------------------------------------------------------------------
class BitWriter:
    """Fields of ``width`` bits, LSB first, appended back to back."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self.bits = 0

    def put(self, values: Any, width: int) -> None:
        """Append each value's low ``width`` bits (negative values in two's complement)."""
        v = np.asarray(values, dtype=np.int64).reshape(-1)
        if width <= 0 or v.size == 0:
            return
        u = v.astype(np.uint64) & np.uint64((1 << width) - 1)
        bits = ((u[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
        self._parts.append(bits.reshape(-1))
        self.bits += v.size * width

    def put_float32(self, t: torch.Tensor) -> None:  # noqa: D102
        self.put(t.detach().to(torch.float32).contiguous().numpy().view(np.uint32).astype(np.int64), 32)

    def to_bytes(self) -> bytes:  # noqa: D102
        if not self._parts:
            return b""
        return np.packbits(np.concatenate(self._parts), bitorder="little").tobytes()


class BitReader:
    """Reads what :class:`BitWriter` wrote."""

    def __init__(self, data: bytes) -> None:
        self._bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        self.pos = 0

    def take(self, n: int, width: int, signed: bool = False) -> np.ndarray:
        """``n`` fields of ``width`` bits as int64 (sign-extended when ``signed``)."""
        end = self.pos + n * width
        if end > self._bits.size:
            raise ValueError("the packed stream ends early")
        if n == 0 or width == 0:
            self.pos = end
            return np.zeros(n, dtype=np.int64)
        chunk = self._bits[self.pos : end].reshape(n, width).astype(np.uint64)
        self.pos = end
        u = (chunk << np.arange(width, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
        if signed:
            sign = np.uint64(1 << (width - 1))
            return (u ^ sign).astype(np.int64) - np.int64(1 << (width - 1))
        return u.astype(np.int64)

    def take_float32(self, n: int) -> torch.Tensor:  # noqa: D102
        return torch.from_numpy(self.take(n, 32).astype(np.uint32).view(np.float32).copy())


# -- one layer -----------------------------------------------------------------------------------------
def _exponents(step: torch.Tensor, what: str) -> np.ndarray:
    e = torch.log2(step.detach().double())
    k = torch.round(e)
    if not bool((e == k).all()) or bool((k.abs() > 127).any()):
        raise PrunqError(f"packed: {what} is not a power of two within 2^±127")
    return k.to(torch.int64).numpy()


def _csr_widths(rows: int, cols: int, nz: int) -> tuple[int, int]:
    return max(1, (max(cols, 1) - 1).bit_length()), max(1, nz.bit_length())


@dataclass
class _Plan:
    """What the packer writes for one layer (and what the cost model measures)."""

    rec: LayerRecord
    value_bits: int
    encoding: str
    r: int
    pow2: bool


def _plan(rec: LayerRecord) -> _Plan:
    q = record_quant(rec)
    mask = rec.weight != 0
    encoding, r, _, _ = choose_encoding(mask, q.effective_weight_bits)
    return _Plan(rec, q.effective_weight_bits, encoding, r, q.scale_bits == 8)


def _levels(rec: LayerRecord) -> torch.Tensor:
    """The weight's integers (weight / channel step), checked to be exact."""
    wq = rec.weight_q
    step = wq.step.reshape(-1, *([1] * (rec.weight.dim() - 1))).to(rec.weight.dtype)
    k = torch.round(rec.weight / step)
    if not torch.equal(k * step, rec.weight) or bool((k < wq.qmin).any() | (k > wq.qmax).any()):
        raise PrunqError(f"packed: {rec.name}: weights are not on their quantization grid (convert the model first)")
    return k.to(torch.int64)


def _write_layer(w: BitWriter, p: _Plan) -> None:
    rec = p.rec
    wq, aq = rec.weight_q, rec.act_q
    flat = rec.weight.reshape(-1)
    mask = flat != 0
    values = _levels(rec).reshape(-1) if wq is not None else flat
    n, nz = flat.numel(), int(mask.sum())
    rows = rec.weight.shape[0]
    cols = n // rows if rows else 0
    if p.encoding == "dense":
        stored, count = values, n
    elif p.encoding == "relative":
        pos = torch.nonzero(mask).reshape(-1)
        gaps = pos - torch.cat([pos.new_full((1,), -1), pos[:-1]]) - 1
        fillers = torch.bitwise_right_shift(gaps, p.r)
        # each non-zero is preceded by its fillers: entries (gap, value) = (M, 0) * f, (g - f * 2^r, v)
        reps = fillers + 1
        entry_gap = torch.full((int(reps.sum()),), (1 << p.r) - 1, dtype=torch.int64)
        last = torch.cumsum(reps, 0) - 1
        entry_gap[last] = gaps - fillers * (1 << p.r)
        stored = torch.zeros(entry_gap.numel(), dtype=values.dtype)
        stored[last] = values[mask]
        count = entry_gap.numel()
    else:
        stored, count = values[mask], nz
    flags = (
        (_PRUNED if rec.pruned else 0) | (_WQ if wq is not None else 0) | (_AQ if aq is not None else 0)
        | (_WQ_AXIS if wq is not None and wq.axis is not None else 0) | (_AQ_SIGNED if aq is not None and aq.signed else 0)
        | (_BIAS if rec.bias is not None else 0) | (_POW2 if p.pow2 else 0)
    )  # fmt: skip
    qflags = 0
    if wq is not None:
        qflags |= (_WQ_SIGNED if wq.signed else 0) | (_WQ_NARROW if wq.narrow else 0) | (_WQ_POW2 if wq.power_of_two else 0)
    if aq is not None:
        qflags |= (_AQ_NARROW if aq.narrow else 0) | (_AQ_POW2 if aq.power_of_two else 0)
    header = [flags, p.value_bits, aq.bits if aq is not None else FLOAT_BITS, ENCODINGS.index(p.encoding) | p.r << 2, qflags]
    w.put(header, 8)
    w.put([count], 32)
    # values
    if wq is not None:
        w.put(stored.numpy(), p.value_bits)
    else:
        w.put_float32(stored)
    # positions
    if p.encoding == "bitmap":
        w.put(mask.to(torch.int64).numpy(), 1)
    elif p.encoding == "csr":
        col_bits, ptr_bits = _csr_widths(rows, cols, nz)
        pos = torch.nonzero(mask).reshape(-1)
        w.put((pos % cols).numpy(), col_bits)
        per_row = torch.bincount(pos // cols, minlength=rows)
        w.put(torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(per_row, 0)]).numpy(), ptr_bits)
    elif p.encoding == "relative":
        w.put(entry_gap.numpy(), p.r)
    # steps: the weight's per channel, then the input's
    for q, what in ((wq, "weight step"), (aq, "activation step")):
        if q is None:
            continue
        if p.pow2:
            w.put(_exponents(q.step.reshape(-1), f"{rec.name}: {what}"), 8)
        else:
            w.put_float32(q.step.reshape(-1))
    if rec.bias is not None:
        w.put_float32(rec.bias.reshape(-1))


def layer_payload_bits(rec: LayerRecord) -> int:
    """Bits :func:`pack` writes for one layer after its header (equal to the cost model's memory_l)."""
    w = BitWriter()
    _write_layer(w, _plan(rec))
    return w.bits - LAYER_HEADER_BITS


# -- the model -----------------------------------------------------------------------------------------
def _layer_keys(name: str, rec: LayerRecord) -> list[str]:
    p = f"{name}." if name else ""
    keys = [f"{p}weight"]
    if rec.bias is not None:
        keys.append(f"{p}bias")
    if rec.weight_q is not None:
        keys += [f"{p}{CONVERTED_STEP}", f"{p}{CONVERTED_BITS}"]
    if rec.act_q is not None:
        keys += [f"{p}{INPUT_QUANTIZER}.step", f"{p}{INPUT_QUANTIZER}.signed", f"{p}{INPUT_QUANTIZER}.calibrated"]
    return keys


def _check_converted(model: nn.Module) -> None:
    from torch.nn.utils import parametrize

    for name, m in recorded_layers(model):
        if parametrize.is_parametrized(m, "weight"):
            raise PrunqError(f"packed: layer {name!r} still has masks or weight quantizers; convert the model first")


def pack(model: nn.Module, manifest: dict[str, Any]) -> bytes:
    """The packed file's bytes for a *converted* model (:func:`prunq.convert`) and its run's manifest."""
    _check_converted(model)
    transforms = []
    for t in manifest.get("transforms", []):
        op = t.get("op")
        if op in STRUCTURAL:
            transforms.append(t)
        elif op not in DESCRIBED:
            raise PrunqError(f"packed: the run's transform {op!r} is not supported by the packed format")
    records = layer_records(model)
    state = model.state_dict()
    covered: set[str] = set()
    seen: set[int] = set()
    w = BitWriter()
    for rec in records:
        if rec.stored_id in seen:
            raise PrunqError(f"packed: layer {rec.name!r} shares its weight with another layer; not supported yet")
        seen.add(rec.stored_id)
        keys = _layer_keys(rec.name, rec)
        missing = [k for k in keys if k not in state]
        if missing:
            raise PrunqError(f"packed: layer {rec.name!r} keeps its state under other names ({missing[0]} missing)")
        covered.update(keys)
        _write_layer(w, _plan(rec))
    for key, t in state.items():
        if key not in covered:
            w.put(np.frombuffer(t.detach().cpu().contiguous().numpy().tobytes(), dtype=np.uint8), 8)
    origin = dict(manifest.get("model") or {})
    if origin.get("origin") == "zoo":
        del origin["origin"]  # implied by a task and a name
    meta = {"format": FORMAT, "model": origin, "transforms": _index_pairs(model, transforms)}
    from safetensors.torch import save

    blob = torch.frombuffer(bytearray(w.to_bytes()), dtype=torch.uint8) if w.bits else torch.zeros(0, dtype=torch.uint8)
    return save({TENSOR: blob}, metadata={META_KEY: json.dumps(meta, separators=(",", ":"))})


def _index_pairs(model: nn.Module, transforms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``fold_bn`` pairs as module indices (in :func:`_structure_names` order, which folding, quantizers
    and conversion leave alone): a few bytes instead of two names per pair."""
    out = []
    for t in transforms:
        if t.get("op") == "fold_bn":
            index = {n: i for i, n in enumerate(_structure_names(model))}
            t = {"op": "fold_bn", "index": [[index[a], index[b]] for a, b in t["pairs"]]}
        out.append(t)
    return out


def _structure_names(model: nn.Module) -> list[str]:
    """Module names without the modules quantization adds (input quantizers, parametrizations)."""
    return [n for n, _ in model.named_modules() if not {INPUT_QUANTIZER, "parametrizations"} & set(n.split("."))]


def _name_pairs(model: nn.Module, transforms: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    names = _structure_names(model)
    out = []
    for t in transforms:
        if isinstance(t, dict) and t.get("op") == "fold_bn" and "index" in t:
            try:
                t = {"op": "fold_bn", "pairs": [[names[a], names[b]] for a, b in t["index"]]}
            except (TypeError, IndexError, ValueError):
                raise PrunqError(f"{source}: fold_bn: module indices out of range") from None
        out.append(t)
    return out


def read_meta(path: str) -> tuple[dict[str, Any], bytes]:
    """The JSON and the stream of a packed file; a file that is not one is a one-line error."""
    try:
        with safe_open(path, "pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
            ours = meta is not None and TENSOR in f.keys()  # noqa: SIM118
            data = f.get_tensor(TENSOR).numpy().tobytes() if ours else b""
        info = json.loads(meta) if ours else None
    except (SafetensorError, OSError, ValueError, RecursionError) as e:
        raise PrunqError(f"{path}: not a readable prunq packed file ({type(e).__name__})") from None
    if info is None:
        raise PrunqError(f"{path}: not a prunq packed file")
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise PrunqError(f"{path}: unsupported packed format {info.get('format') if isinstance(info, dict) else info!r}")
    return info, data


def _meta_of(flags: int, qflags: int, wbits: int, abits: int) -> dict[str, Any]:
    weight = act = None
    if flags & _WQ:
        weight = {"bits": wbits, "axis": 0 if flags & _WQ_AXIS else None, "signed": bool(qflags & _WQ_SIGNED),
                  "narrow": bool(qflags & _WQ_NARROW), "power_of_two": bool(qflags & _WQ_POW2), "zero_point": 0}  # fmt: skip
    if flags & _AQ:
        act = {"bits": abits, "axis": None, "signed": bool(flags & _AQ_SIGNED), "narrow": bool(qflags & _AQ_NARROW),
               "power_of_two": bool(qflags & _AQ_POW2), "zero_point": 0}  # fmt: skip
    return {"weight": weight, "act": act}


def unpack(model: nn.Module, info: dict[str, Any], data: bytes, source: str,
           replay: Callable[[nn.Module, list[dict[str, Any]], str], nn.Module]) -> nn.Module:  # fmt: skip
    """Give a fresh ``model`` (the run's architecture) the packed structure and values: the converted model.

    ``replay`` is :func:`prunq.core.manifest.replay` (passed in: the transforms' replay functions live
    with the methods)."""
    from prunq.quant.prepare import convert

    transforms = info.get("transforms", [])
    if not isinstance(transforms, list):
        raise PrunqError(f"{source}: transforms: expected a list")
    for t in transforms:  # one at a time: fold_bn's module indices are those of the model at that point
        model = replay(model, _name_pairs(model, [t], source), source)
    names = [n for n, _ in recorded_layers(model)]
    reader = BitReader(data)
    headers = []
    modules = dict(model.named_modules())
    for name in names:  # pass 1: the headers (the structure must exist before the state is filled)
        h = reader.take(5, 8)
        count = int(reader.take(1, 32)[0])
        headers.append((name, h, count, reader.pos))
        _skip_layer(reader, modules[name], h, count)
    pruned = [name for name, h, _, _ in headers if h[0] & _PRUNED]
    quantized = {name: _meta_of(int(h[0]), int(h[4]), int(h[1]), int(h[2])) for name, h, _, _ in headers
                 if h[0] & (_WQ | _AQ)}  # fmt: skip
    model = replay(model, [{"op": "mask", "layers": pruned}, {"op": "quantize", "layers": quantized}], source)
    convert(model)
    state = model.state_dict()
    modules = dict(model.named_modules())
    reader = BitReader(data)
    covered: set[str] = set()
    for name, h, count, _ in headers:
        reader.take(5, 8)
        reader.take(1, 32)
        covered.update(_read_layer(reader, modules[name], name, h, count, state))
    for key, t in state.items():
        if key in covered:
            continue
        raw = reader.take(t.numel() * t.element_size(), 8).astype(np.uint8).tobytes()
        state[key] = torch.frombuffer(bytearray(raw), dtype=t.dtype).reshape(t.shape).clone() if raw else t
    model.load_state_dict(state, strict=True)
    return model.eval()


def _layer_shape(module: nn.Module) -> tuple[int, ...]:
    from prunq.core.layers import canonical_shape

    return tuple(canonical_shape(module))


def _fields(module, h, count) -> tuple[int, int, int, int, int, int]:
    shape = _layer_shape(module)
    n = int(np.prod(shape))
    rows = shape[0]
    return n, rows, n // rows if rows else 0, int(h[1]), ENCODINGS[int(h[3]) & 3], int(h[3]) >> 2


def _skip_layer(reader: BitReader, module: nn.Module, h, count: int) -> None:
    _read_values_and_positions(reader, module, h, count)
    flags = int(h[0])
    rows = _layer_shape(module)[0]
    nsteps = (rows if flags & _WQ_AXIS else 1) if flags & _WQ else 0
    nsteps += 1 if flags & _AQ else 0
    reader.take(nsteps, 8 if flags & _POW2 else 32)
    if flags & _BIAS:
        reader.take(rows, 32)


def _read_values_and_positions(reader: BitReader, module: nn.Module, h, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's canonical values (levels or floats) and its flat keep-positions."""
    n, rows, cols, vbits, encoding, r = _fields(module, h, count)
    flags = int(h[0])
    if flags & _WQ:
        vals = torch.from_numpy(reader.take(count, vbits, signed=True))
    else:
        vals = reader.take_float32(count)
    if encoding == "dense":
        return vals, torch.arange(n)
    if encoding == "bitmap":
        pos = torch.nonzero(torch.from_numpy(reader.take(n, 1))).reshape(-1)
    elif encoding == "csr":
        col_bits, ptr_bits = _csr_widths(rows, cols, count)
        col = torch.from_numpy(reader.take(count, col_bits))
        ptr = torch.from_numpy(reader.take(rows + 1, ptr_bits))
        row = torch.repeat_interleave(torch.arange(rows), ptr[1:] - ptr[:-1])
        pos = row * cols + col
    else:
        gaps = torch.from_numpy(reader.take(count, r))
        entry_pos = torch.cumsum(gaps + 1, 0) - 1
        keep = vals != 0
        pos, vals = entry_pos[keep], vals[keep]
    return vals, pos


def _read_layer(reader: BitReader, module: nn.Module, name: str, h, count: int, state: dict) -> list[str]:
    flags = int(h[0])
    shape = _layer_shape(module)
    rows = shape[0]
    vals, pos = _read_values_and_positions(reader, module, h, count)
    p = f"{name}." if name else ""
    keys = [f"{p}weight"]
    steps = []
    for present, num in ((flags & _WQ, rows if flags & _WQ_AXIS else 1), (flags & _AQ, 1)):
        if not present:
            steps.append(None)
        elif flags & _POW2:
            steps.append(torch.pow(2.0, torch.from_numpy(reader.take(num, 8, signed=True)).to(torch.float32)))
        else:
            steps.append(reader.take_float32(num))
    wstep, astep = steps
    weight = torch.zeros(int(np.prod(shape)), dtype=torch.float32)
    if wstep is not None:
        per = wstep.reshape(-1)
        ch = pos // (weight.numel() // rows) if per.numel() > 1 else torch.zeros_like(pos)
        weight[pos] = vals.to(torch.float32) * per[ch]
        keys += [f"{p}{CONVERTED_STEP}", f"{p}{CONVERTED_BITS}"]
        state[f"{p}{CONVERTED_STEP}"] = per.clone()
        state[f"{p}{CONVERTED_BITS}"] = torch.tensor(int(h[1]), dtype=torch.int64)
    else:
        weight[pos] = vals
    state[f"{p}weight"] = from_canonical(weight.reshape(shape), module).contiguous()
    if astep is not None:
        q = f"{p}{INPUT_QUANTIZER}"
        state[f"{q}.step"] = astep.reshape(()).clone()
        state[f"{q}.signed"] = torch.tensor(bool(flags & _AQ_SIGNED))
        state[f"{q}.calibrated"] = torch.tensor(True)
        keys += [f"{q}.step", f"{q}.signed", f"{q}.calibrated"]
    if flags & _BIAS:
        state[f"{p}bias"] = reader.take_float32(rows)
        keys.append(f"{p}bias")
    return keys


__all__ = ["pack", "unpack", "read_meta", "layer_payload_bits", "BitWriter", "BitReader", "LAYER_HEADER_BITS"]
