"""The cost model (METHOD.md §4): parameters, non-zeros, MACs, BOPs, sparse encodings and memory.

Everything is measured on the *effective* weight ``module.weight`` -- under prunq's parametrizations that
is ``Q(mask * W)`` -- viewed in the canonical layout ``(out, in_per_group, *kernel)`` of
:mod:`prunq.core.layers`, so a pruned or quantized-to-zero weight counts as zero whatever produced it.

Per compressed layer ``l`` (``N_l`` weights, ``nz_l`` non-zeros, ``rho_l = nz_l / N_l``, dense
``MAC_l`` per sample, weight bits ``b_w``, input-activation bits ``b_a``):

* ``bops_l = MAC_l * rho_l * b_w * b_a`` (the *weight BOPs*; ``rho_l`` counting only weights on live
  input channels);
* ``memory_l = nz_l * b_w + index_bits_l + scale_bits_l + 32 * bias numel`` with the cheapest of four
  position encodings (``dense`` stores all ``N_l`` values and no index);
* ``entropy_bits_l = N_l * H(rho_l)``, the information-theoretic floor for the positions.

Multiplies no compressed layer owns -- correlation volumes, attention ``Q K^T`` / ``A V``, soft-argmin's
weighted sum -- are the *activation BOPs*: ``act_bops = sum_site MAC_site * b_a * b_a'`` over the
:class:`~prunq.cost.products.ActSite` records of :func:`~prunq.cost.products.count_activation_products` (its
docstring has the rules: what is an activation, the bits, constants, dead channels). ``bops = weight_bops +
act_bops``. The dense references count both: ``dense_fp32_bops = (sum_l MAC_l + sum_site dense MAC_site) *
32 * 32`` (int8: ``* 8 * 8``), so ``bops_ratio`` stays "compressed vs dense fp32" with every multiply in
both numerator and denominator.

Choices this module makes where METHOD.md leaves room (each also said where it is implemented):

* A bit-width ``>= 16`` means "not quantized": the value is a float and costs 32 bits (weights and,
  for the same reason, activations); its step values are not stored.
* Parameters living *inside* a measured layer (its weight and every parametrization of it, e.g. a
  learned weight step; its bias; any quantizer attached as a child module) are accounted by that
  layer's terms -- ``N_l`` weights, ``LayerQuant`` scales, 32-bit bias -- never again as "other".
  Everything else (normalisation, excluded layers, embeddings, quantizers that are sibling modules)
  is ``other_params`` at 32 bits. Buffers (masks, running statistics) are not parameters and cost 0.
* Activation-product bits: an operand costs the bits of the activation quantizer whose output it is
  (through value-preserving views, slicing, ``cat``, ``relu``), else 32 -- prunq quantizes only the inputs
  of compressed layers, so today these products are 32 x 32 unless a model puts an ``ActQuantizer`` module
  in front of them. An operand that is a fixed tensor (soft-argmin's disparity values) is a 32-bit
  float, like an unquantized weight: ``b_a x 32``; its zero entries cost nothing, as zero weights do.
* Ratios are ``compressed / reference`` (0.01 = 99 % cut). With ``reference=`` the ``dense_*`` fields
  of the result *are* the reference's, so ``memory_ratio == memory_bits / dense_fp32_memory_bits``
  always holds on one object.

This is a lower layer: it imports :mod:`prunq.core` and :mod:`prunq.cost` only (and, through
:mod:`prunq.cost.macs`, :mod:`prunq.quant`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunq.core.config import QUANT_BITS, check_bits
from prunq.core.errors import PrunqError
from prunq.core.graph import ChannelGraph
from prunq.core.records import LayerRecord, layer_records, recorded_layers
from prunq.cost.encodings import (
    ENCODINGS,
    FLOAT_BITS,
    best_relative,
    entropy_bound_bits,
    index_bits,
    relative_bits,
)
from prunq.cost.macs import _count_macs, count_macs, example_batch_size
from prunq.cost.products import ActSite, count_activation_products

__all__ = [
    "ENCODINGS",
    "FLOAT_BITS",
    "ActSite",
    "LayerCost",
    "LayerQuant",
    "ModelCost",
    "best_relative",
    "count_activation_products",
    "count_macs",
    "entropy_bound_bits",
    "index_bits",
    "measure",
    "relative_bits",
]

_INT8 = 8


# --------------------------------------------------------------------------------------------------
# Per-layer quantization description
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerQuant:
    """What the quantization stage tells the cost model about one layer.

    ``weight_scales`` is the number of weight step values stored (per-channel: the out channels,
    per-tensor: 1), ``act_scales`` the number of input-activation steps (0 or 1), ``scale_bits`` the bits
    of each stored step (32 for a float step; a power-of-two step may be stored as an 8-bit exponent).

    >>> LayerQuant(weight_bits=4, act_bits=8, weight_scales=16, act_scales=1).weight_bits
    4
    """

    weight_bits: int = FLOAT_BITS
    act_bits: int = FLOAT_BITS
    weight_scales: int = 0
    act_scales: int = 0
    scale_bits: int = FLOAT_BITS

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "LayerQuant.weight_bits")  # the one bit-width rule
        check_bits(self.act_bits, "LayerQuant.act_bits")
        v = self.scale_bits
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PrunqError(f"LayerQuant.scale_bits: expected a positive integer, got {v!r}")
        for name in ("weight_scales", "act_scales"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PrunqError(f"LayerQuant.{name}: expected a non-negative integer, got {v!r}")

    @property
    def weights_quantized(self) -> bool:
        """False when ``weight_bits >= 16`` (costed as 32-bit floats, no weight steps stored)."""
        return self.weight_bits in QUANT_BITS

    @property
    def acts_quantized(self) -> bool:
        """False when ``act_bits >= 16`` (costed as 32-bit floats, no activation step stored)."""
        return self.act_bits in QUANT_BITS

    @property
    def effective_weight_bits(self) -> int:
        """Bits per stored weight value: ``weight_bits``, or 32 when unquantized."""
        return self.weight_bits if self.weights_quantized else FLOAT_BITS

    @property
    def effective_act_bits(self) -> int:
        """Bits per input activation in a multiply: ``act_bits``, or 32 when unquantized."""
        return self.act_bits if self.acts_quantized else FLOAT_BITS

    @property
    def stored_scale_bits(self) -> int:
        """``scale_bits * (weight_scales + act_scales)``, counting only the steps of quantized tensors."""
        n = (self.weight_scales if self.weights_quantized else 0) + (self.act_scales if self.acts_quantized else 0)
        return self.scale_bits * n


_FLOAT = LayerQuant()


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class LayerCost:
    """The cost of one compressed layer (METHOD.md §4); all bit counts are integers.

    ``weight_bits`` / ``act_bits`` are the bits actually costed (32 when unquantized), so
    ``bops == macs * density * weight_bits * act_bits`` on the fields themselves. ``index_bits`` holds
    every encoding's position bits (``dense``: 0); ``encoding`` names the cheapest and ``memory_bits``
    is its total: values + index + ``scale_bits`` + ``bias_bits``.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    nonzeros: int
    density: float
    macs: int
    weight_bits: int
    act_bits: int
    bops: float
    index_bits: dict[str, int]
    relative_r: int
    entropy_bits: float
    encoding: str
    scale_bits: int
    bias_bits: int
    memory_bits: int
    pruned: bool = False  # the layer carries a pruning mask (its weights count toward ``sparsity``)
    stored: bool = True  # False for a later user of a tensor shared with an earlier layer
    dead_inputs: int = 0  # input channels whose producers are pruned away (their weights cost no BOPs)
    live_nonzeros: int = -1  # non-zeros not on a dead input channel (what ``bops`` counts); -1 = nonzeros

    def value_bits(self, encoding: str) -> int:
        """Bits of the stored weight values under ``encoding`` (``dense``: all ``N``; else ``nz``)."""
        n = self.params if encoding == "dense" else self.nonzeros
        return n * self.weight_bits

    def memory_bits_as(self, encoding: str) -> int:
        """The layer's memory if it used ``encoding``."""
        return self.value_bits(encoding) + self.index_bits[encoding] + self.scale_bits + self.bias_bits

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (shape as a list, non-finite floats as None)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "params": self.params,
            "nonzeros": self.nonzeros,
            "density": _json_float(self.density),
            "macs": self.macs,
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "bops": _json_float(self.bops),
            "index_bits": dict(self.index_bits),
            "relative_r": self.relative_r,
            "entropy_bits": _json_float(self.entropy_bits),
            "encoding": self.encoding,
            "scale_bits": self.scale_bits,
            "bias_bits": self.bias_bits,
            "memory_bits": self.memory_bits,
            "pruned": self.pruned,
            "stored": self.stored,
            "dead_inputs": self.dead_inputs,
            "live_nonzeros": self.nonzeros if self.live_nonzeros < 0 else self.live_nonzeros,
        }


@dataclass
class ModelCost:
    """The cost of a whole model: per-layer :class:`LayerCost` and the totals and ratios of METHOD.md §4.

    ``dense_*`` are the figures the ratios are taken against: this model's own dense equivalents, or
    the ``reference`` model's when :func:`measure` was given one. Ratios are ``compressed / dense``.

    ``macs`` are the compressed layers' (dense) MACs; ``act_macs`` the live activation-product MACs.
    ``bops == weight_bops + act_bops``: ``weight_bops = sum(layer.bops)``, ``act_bops = sum(site.bops)``
    over ``act_sites``.
    """

    layers: list[LayerCost]
    params: int
    prunable_params: int
    nonzeros: int
    sparsity: float
    macs: int
    bops: float
    weight_bops: float
    act_bops: float
    act_macs: int
    act_sites: list[ActSite]
    memory_bits: int
    memory_bits_by_encoding: dict[str, int]
    other_params: int
    other_bits: int
    dense_fp32_bops: int
    dense_fp32_memory_bits: int
    dense_int8_bops: int
    dense_int8_memory_bits: int
    memory_ratio: float
    bops_ratio: float
    memory_ratio_int8: float
    bops_ratio_int8: float

    def layer(self, name: str) -> LayerCost:
        """The :class:`LayerCost` of layer ``name`` (KeyError if it was not measured)."""
        for lc in self.layers:
            if lc.name == name:
                return lc
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``json.dumps(..., allow_nan=False)`` works): totals, ratios and ``layers``."""
        out: dict[str, Any] = {}
        for k in (
            "params", "prunable_params", "nonzeros", "sparsity", "macs", "bops", "weight_bops", "act_bops",
            "act_macs", "memory_bits",
            "other_params", "other_bits", "dense_fp32_bops", "dense_fp32_memory_bits", "dense_int8_bops",
            "dense_int8_memory_bits", "memory_ratio", "bops_ratio", "memory_ratio_int8", "bops_ratio_int8",
        ):  # fmt: skip
            v = getattr(self, k)
            out[k] = _json_float(v) if isinstance(v, float) else v
        out["memory_bits_by_encoding"] = dict(self.memory_bits_by_encoding)
        out["layers"] = [lc.to_dict() for lc in self.layers]
        out["act_sites"] = [s.to_dict() for s in self.act_sites]
        return out


# --------------------------------------------------------------------------------------------------
# Measuring a model
# --------------------------------------------------------------------------------------------------


def _layer_param_ids(module: nn.Module) -> set[int]:
    # Every parameter inside a measured layer: its weight (the parametrization's ``original`` and any
    # quantizer parameter such as a learned step), its bias, and any child quantizer. The layer's own
    # terms (N_l values, LayerQuant scales, 32-bit bias) stand for all of them.
    return {id(p) for p in module.parameters(recurse=True)}


def _ratio(num: float, den: float) -> float:
    if den:
        return float(num) / float(den)
    return 0.0 if num == 0 else math.inf


def dead_input_channels(model: nn.Module, example_inputs: Any) -> dict[str, torch.Tensor]:
    """``{layer: BoolTensor(input channels)}`` of input channels that only ever receive zeros ({} when
    the model cannot be traced: every channel then counts as alive)."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untraceable model is measured as before: all channels alive
        graph = ChannelGraph.build(model, args)
    return graph.dead_input_channels(model) if graph.traced else {}


def record_quant(rec: LayerRecord) -> LayerQuant:
    """The :class:`LayerQuant` a layer's own quantizer records describe (float when it has none).

    Power-of-two steps are stored as 8-bit exponents (METHOD.md §7), other steps as 32-bit floats.
    """
    wq, aq = rec.weight_q, rec.act_q
    pow2 = (wq is None or wq.power_of_two) and (aq is None or aq.power_of_two) and (wq is not None or aq is not None)
    return LayerQuant(
        weight_bits=wq.bits if wq is not None else FLOAT_BITS,
        act_bits=aq.bits if aq is not None else FLOAT_BITS,
        weight_scales=wq.num_steps if wq is not None else 0,
        act_scales=aq.num_steps if aq is not None else 0,
        scale_bits=8 if pow2 else FLOAT_BITS,
    )


def live_weights(weight: torch.Tensor, dead_inputs: torch.Tensor | None) -> torch.Tensor:
    """Canonical boolean mask of the weights that do work: non-zero and not on a dead input channel.

    Input channel ``c`` of a layer with ``g`` groups feeds canonical column ``c % in_per_group`` of the
    output channels of group ``c // in_per_group`` (a Linear: column ``c``; after a flatten, input
    "channels" are the Linear's features).
    """
    nz = weight != 0
    if dead_inputs is None or not bool(dead_inputs.any()):
        return nz
    out, in_pg = weight.shape[0], weight.shape[1]
    groups = dead_inputs.numel() // in_pg if in_pg else 1
    if groups < 1 or groups * in_pg != dead_inputs.numel() or out % groups:
        return nz  # a layout the graph did not describe: count every weight
    dead = dead_inputs.reshape(groups, 1, in_pg).expand(groups, out // groups, in_pg).reshape(out, in_pg)
    return nz & ~dead.reshape(out, in_pg, *([1] * (weight.dim() - 2)))


def choose_encoding(mask: torch.Tensor, value_bits: int) -> tuple[str, int, dict[str, int], dict[str, int]]:
    """``(encoding, relative r, index bits per encoding, value + index bits per encoding)`` of a canonical
    boolean mask whose non-zeros are stored at ``value_bits``: the cheapest of :data:`ENCODINGS` (ties go
    to the first). The one choice the cost model and the packed exporter both use.

    >>> choose_encoding(torch.tensor([[True, False, False, False]]), 4)[0]   # 4 + 1 gap bit < 16 dense
    'relative'
    >>> choose_encoding(torch.ones(1, 4, dtype=torch.bool), 4)[0]            # no index beats any index
    'dense'
    """
    n, nz = mask.numel(), int(mask.sum())
    rel_bits, rel_r = best_relative(mask, value_bits=value_bits)
    idx = {"dense": 0, "bitmap": index_bits(mask, "bitmap"), "csr": index_bits(mask, "csr"), "relative": rel_bits}
    totals = {e: (n if e == "dense" else nz) * value_bits + idx[e] for e in ENCODINGS}
    return min(ENCODINGS, key=lambda e: totals[e]), rel_r, idx, totals


def _measure_layer(
    rec: LayerRecord, macs: int, q: LayerQuant, *, stored: bool = True, dead_inputs: torch.Tensor | None = None
) -> LayerCost:
    """One layer's cost from its record. ``stored=False`` for the second user of a shared tensor: its
    MACs and BOPs count, its memory was counted with the first user. Weights on ``dead_inputs`` channels
    (input channels whose producers were pruned away) multiply only zeros: they cost no BOPs."""
    mask = rec.weight != 0
    live = int(live_weights(rec.weight, dead_inputs).sum())
    shape = rec.shape
    n = mask.numel()
    nz = int(mask.sum())
    bw = q.effective_weight_bits
    ba = q.effective_act_bits
    encoding, rel_r, idx, totals = choose_encoding(mask, bw)
    bias_bits = FLOAT_BITS * (rec.bias.numel() if rec.bias is not None else 0)
    scale_bits = q.stored_scale_bits
    density = nz / n if n else 0.0
    memory = totals[encoding] + scale_bits + bias_bits
    if not stored:  # the shared weight (values, positions, steps) was counted with its first user
        idx = dict.fromkeys(idx, 0)
        memory = bias_bits
    return LayerCost(
        name=rec.name,
        kind=rec.kind,
        shape=shape,
        params=n,
        nonzeros=nz,
        density=density,
        macs=int(macs),
        weight_bits=bw,
        act_bits=ba,
        bops=(macs * live * bw * ba) / n if n else 0.0,
        index_bits=idx,
        relative_r=rel_r,
        entropy_bits=entropy_bound_bits(n, nz) if stored else 0.0,
        encoding=encoding,
        scale_bits=scale_bits if stored else 0,
        bias_bits=bias_bits,
        memory_bits=memory,
        pruned=rec.pruned,
        stored=stored,
        dead_inputs=int(dead_inputs.sum()) if dead_inputs is not None else 0,
        live_nonzeros=live,
    )


@torch.no_grad()
def measure(
    model: nn.Module,
    example_inputs: tuple,
    quant: Mapping[str, LayerQuant] | None = None,
    exclude: Iterable[str] = (),
    reference: ModelCost | None = None,
    macs: dict[str, int] | None = None,
    dead_channels: bool = True,
    batch_size: int | None = None,
    act_sites: list[ActSite] | None = None,
) -> ModelCost:
    """Measure ``model`` with the cost model of METHOD.md §4.

    Args:
        model: any module; its compressible layers (Conv/ConvTranspose 1-3d, Linear) not matching an
            ``exclude`` pattern are measured on their effective weight ``module.weight``.
        example_inputs: positional inputs for one forward at batch size 1 (ignored when ``macs`` is given).
        quant: ``{layer name: LayerQuant}``; a layer not named is unquantized (32/32). A name that is not
            a measured layer is an error (it would otherwise be silently costed as float).
        exclude: name patterns of layers not to measure (their parameters are ``other_params``).
        reference: the :class:`ModelCost` of the dense, uncompressed model; ratios are then taken against
            *its* dense fp32 / int8 figures (the compressed model may have fewer parameters, e.g. after
            batch-norm folding), and this result's ``dense_*`` fields are copied from it.
        macs: precomputed :func:`count_macs` result, to skip that forward pass.
        batch_size: examples in ``example_inputs`` (default: the first input's leading dimension; pass it
            for a sequence-first ``(T, B, ...)`` input), see :func:`prunq.cost.macs.count_macs`.
        dead_channels: trace the model's channel graph (:class:`prunq.core.graph.ChannelGraph`) and
            charge no BOPs for weights on a dead input channel — one whose producing filters are all
            zero with no bias or BatchNorm shift (METHOD.md §4). A model fx cannot trace counts every
            input channel as alive. Also leaves dead channels out of the activation products.
        act_sites: precomputed :func:`count_activation_products` result; by default they are counted on
            ``example_inputs`` (none when ``example_inputs`` is None; pass ``[]`` to leave them out).

    Definitions:
        * ``params``: every parameter of the model, a measured layer counting ``N_l`` + its bias (see the
          module docstring for parametrization / quantizer parameters); ``prunable_params = sum N_l``;
          ``other_params`` the rest, costed ``other_bits = 32 * other_params``.
        * ``sparsity = 1 - sum nz_l / sum N_l`` over the measured layers.
        * ``memory_bits = sum_l min_encoding memory_l + other_bits``; ``memory_bits_by_encoding[e]`` is the
          same with every layer forced to ``e`` (``"best"`` == ``memory_bits``).
        * ``bops = weight_bops + act_bops``: ``weight_bops = sum_l MAC_l * rho_l * b_w * b_a``,
          ``act_bops = sum_site MAC_site * b_a * b_a'`` (module docstring).
        * Dense fp32: ``(sum MAC_l + sum dense MAC_site) * 32 * 32`` BOPs and ``32 * params`` bits. Dense
          int8: the same MACs ``* 8 * 8`` BOPs and ``8 * prunable_params + 32 * (params - prunable_params)``
          bits (no steps counted).

    >>> m = nn.Sequential(nn.Linear(4, 3, bias=False))
    >>> c = measure(m, (torch.zeros(1, 4),), quant={"0": LayerQuant(weight_bits=8, act_bits=8)})
    >>> c.macs, c.bops, c.memory_bits, c.dense_fp32_memory_bits, c.memory_ratio
    (12, 768.0, 96, 384, 0.25)
    """
    quant = dict(quant or {})
    layers = recorded_layers(model, exclude)
    if not layers:
        raise PrunqError(
            "model has no compressible layer (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear)"
            + (f" outside exclude={list(exclude)!r}" if exclude else "")
        )
    names = [n for n, _ in layers]
    unknown = sorted(set(quant) - set(names))
    if unknown:
        raise PrunqError(f"quant: {unknown} are not measured layers (measured: {names})")
    batch = batch_size
    if macs is None:
        macs, batch = _count_macs(model, example_inputs, exclude, batch_size)
    missing = [n for n in names if n not in macs]
    if missing:
        raise PrunqError(f"macs: no MAC count for layers {missing}")

    records = layer_records(model, exclude)
    dead = dead_input_channels(model, example_inputs) if dead_channels and example_inputs is not None else {}
    seen: set[int] = set()
    costs = []
    for rec in records:
        q = quant.get(rec.name) or record_quant(rec)
        costs.append(
            _measure_layer(rec, macs[rec.name], q, stored=rec.stored_id not in seen, dead_inputs=dead.get(rec.name))
        )
        seen.add(rec.stored_id)

    layer_ids: set[int] = set()
    for _, mod in layers:
        layer_ids |= _layer_param_ids(mod)
    other_params = sum(p.numel() for p in model.parameters() if id(p) not in layer_ids)
    other_bits = FLOAT_BITS * other_params
    stored = [lc for lc in costs if lc.stored]
    prunable = sum(lc.params for lc in stored)
    bias_params = sum(lc.bias_bits for lc in costs) // FLOAT_BITS
    params = prunable + bias_params + other_params
    nonzeros = sum(lc.nonzeros for lc in stored)
    # Sparsity is over the prunable (masked) weights only (METHOD.md §2); a model pruned elsewhere (no
    # masks) is measured over every layer.
    counted = [lc for lc in stored if lc.pruned] or stored
    counted_n = sum(lc.params for lc in counted)
    sparsity = 1.0 - sum(lc.nonzeros for lc in counted) / counted_n if counted_n else 0.0
    total_macs = sum(lc.macs for lc in costs)
    weight_bops = float(sum(lc.bops for lc in costs))
    if act_sites is None:
        if example_inputs is None:
            act_sites = []
        else:
            if batch is None:
                batch = example_batch_size(example_inputs)
            act_sites = count_activation_products(model, example_inputs, batch_size=batch, dead_channels=dead_channels)
    act_sites = list(act_sites)
    act_bops = float(sum(s.bops for s in act_sites))
    act_macs = sum(s.macs for s in act_sites)
    dense_act_macs = sum(s.dense_macs for s in act_sites)
    bops = weight_bops + act_bops
    shared_bias = sum(lc.bias_bits for lc in costs if not lc.stored)
    by_enc = {e: sum(lc.memory_bits_as(e) for lc in stored) + shared_bias + other_bits for e in ENCODINGS}
    memory_bits = sum(lc.memory_bits for lc in costs) + other_bits
    by_enc["best"] = memory_bits

    if reference is not None:
        fp32_bops, fp32_mem = reference.dense_fp32_bops, reference.dense_fp32_memory_bits
        int8_bops, int8_mem = reference.dense_int8_bops, reference.dense_int8_memory_bits
    else:
        fp32_bops = (total_macs + dense_act_macs) * FLOAT_BITS * FLOAT_BITS
        fp32_mem = FLOAT_BITS * params
        int8_bops = (total_macs + dense_act_macs) * _INT8 * _INT8
        int8_mem = _INT8 * prunable + FLOAT_BITS * (params - prunable)

    return ModelCost(
        layers=costs,
        params=params,
        prunable_params=prunable,
        nonzeros=nonzeros,
        sparsity=sparsity,
        macs=total_macs,
        bops=bops,
        weight_bops=weight_bops,
        act_bops=act_bops,
        act_macs=act_macs,
        act_sites=act_sites,
        memory_bits=memory_bits,
        memory_bits_by_encoding=by_enc,
        other_params=other_params,
        other_bits=other_bits,
        dense_fp32_bops=fp32_bops,
        dense_fp32_memory_bits=fp32_mem,
        dense_int8_bops=int8_bops,
        dense_int8_memory_bits=int8_mem,
        memory_ratio=_ratio(memory_bits, fp32_mem),
        bops_ratio=_ratio(bops, fp32_bops),
        memory_ratio_int8=_ratio(memory_bits, int8_mem),
        bops_ratio_int8=_ratio(bops, int8_bops),
    )
