"""The cost model (METHOD.md §4): parameters, non-zeros, MACs, BOPs, sparse encodings and memory.

Everything is measured on the *effective* weight ``module.weight`` -- under prunq's parametrizations that
is ``Q(mask * W)`` -- viewed in the canonical layout ``(out, in_per_group, *kernel)`` of
:mod:`prunq.core.layers`, so a pruned or quantized-to-zero weight counts as zero whatever produced it.

Per compressed layer ``l`` (``N_l`` weights, ``nz_l`` non-zeros, ``rho_l = nz_l / N_l``, dense
``MAC_l`` per sample, weight bits ``b_w``, input-activation bits ``b_a``):

* ``bops_l = MAC_l * rho_l * b_w * b_a``;
* ``memory_l = nz_l * b_w + index_bits_l + scale_bits_l + 32 * bias numel`` with the cheapest of four
  position encodings (``dense`` stores all ``N_l`` values and no index);
* ``entropy_bits_l = N_l * H(rho_l)``, the information-theoretic floor for the positions.

Choices this module makes where METHOD.md leaves room (each also said where it is implemented):

* A bit-width ``>= 16`` means "not quantized": the value is a float and costs 32 bits (weights and,
  for the same reason, activations); its step values are not stored.
* Parameters living *inside* a measured layer (its weight and every parametrization of it, e.g. a
  learned weight step; its bias; any quantizer attached as a child module) are accounted by that
  layer's terms -- ``N_l`` weights, ``LayerQuant`` scales, 32-bit bias -- never again as "other".
  Everything else (normalisation, excluded layers, embeddings, quantizers that are sibling modules)
  is ``other_params`` at 32 bits. Buffers (masks, running statistics) are not parameters and cost 0.
* Ratios are ``compressed / reference`` (0.01 = 99 % cut). With ``reference=`` the ``dense_*`` fields
  of the result *are* the reference's, so ``memory_ratio == memory_bits / dense_fp32_memory_bits``
  always holds on one object.

This is a lower layer: it imports :mod:`prunq.core.layers` and :mod:`prunq.core.errors` only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from prunq.cost.encodings import (
    ENCODINGS,
    FLOAT_BITS,
    best_relative,
    entropy_bound_bits,
    index_bits,
    relative_bits,
)
from prunq.core.errors import PrunqError
from prunq.core.layers import canonical_shape, compressible_layers, macs_per_sample, to_canonical

__all__ = [
    "ENCODINGS",
    "FLOAT_BITS",
    "LayerQuant",
    "LayerCost",
    "ModelCost",
    "count_macs",
    "measure",
    "entropy_bound_bits",
    "index_bits",
    "relative_bits",
    "best_relative",
]

#: Bit-widths at or above this are treated as unquantized floats (``FLOAT_BITS`` each).
UNQUANTIZED_FROM = 16
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
        for name in ("weight_bits", "act_bits", "scale_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PrunqError(f"LayerQuant.{name}: expected a positive integer, got {v!r}")
        for name in ("weight_scales", "act_scales"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PrunqError(f"LayerQuant.{name}: expected a non-negative integer, got {v!r}")

    @property
    def weights_quantized(self) -> bool:
        """False when ``weight_bits >= 16`` (costed as 32-bit floats, no weight steps stored)."""
        return self.weight_bits < UNQUANTIZED_FROM

    @property
    def acts_quantized(self) -> bool:
        """False when ``act_bits >= 16`` (costed as 32-bit floats, no activation step stored)."""
        return self.act_bits < UNQUANTIZED_FROM

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
        }


@dataclass
class ModelCost:
    """The cost of a whole model: per-layer :class:`LayerCost` and the totals and ratios of METHOD.md §4.

    ``dense_*`` are the figures the ratios are taken against: this model's own dense equivalents, or
    the ``reference`` model's when :func:`measure` was given one. Ratios are ``compressed / dense``.
    """

    layers: list[LayerCost]
    params: int
    prunable_params: int
    nonzeros: int
    sparsity: float
    macs: int
    bops: float
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
            "params", "prunable_params", "nonzeros", "sparsity", "macs", "bops", "memory_bits",
            "other_params", "other_bits", "dense_fp32_bops", "dense_fp32_memory_bits", "dense_int8_bops",
            "dense_int8_memory_bits", "memory_ratio", "bops_ratio", "memory_ratio_int8", "bops_ratio_int8",
        ):  # fmt: skip
            v = getattr(self, k)
            out[k] = _json_float(v) if isinstance(v, float) else v
        out["memory_bits_by_encoding"] = dict(self.memory_bits_by_encoding)
        out["layers"] = [lc.to_dict() for lc in self.layers]
        return out


# --------------------------------------------------------------------------------------------------
# Measuring a model
# --------------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: tuple, exclude: Iterable[str] = ()) -> dict[str, int]:
    """Dense multiply-accumulates per sample of every compressible layer, by forward hooks.

    Runs ``model(*example_inputs)`` once (meant for a batch of 1; MACs are divided by the batch anyway)
    in eval mode under ``no_grad``, then restores every module's own train/eval flag. A layer called
    several times in one forward (a siamese feature extractor) adds up its calls; a layer never called
    gets 0. Tensor inputs are moved to the model's device.

    >>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 4))
    >>> count_macs(m, (torch.zeros(1, 1, 5, 5),))
    {'0': 162, '2': 72}
    """
    layers = list(compressible_layers(model, exclude))
    macs = {name: 0 for name, _ in layers}

    def hook_for(name: str):
        def hook(module: nn.Module, inp: tuple, out: Any) -> None:
            if not inp or not isinstance(inp[0], torch.Tensor) or not isinstance(out, torch.Tensor):
                raise PrunqError(f"count_macs: layer {name!r} was not called with a tensor")
            macs[name] += macs_per_sample(module, inp[0], out)

        return hook

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    device = _model_device(model)
    if device is not None:
        example_inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in example_inputs)
    modes = [(m, m.training) for m in model.modules()]
    handles = [module.register_forward_hook(hook_for(name)) for name, module in layers]
    try:
        model.eval()
        model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, was_training in modes:
            m.training = was_training
    return macs


def _layer_param_ids(module: nn.Module) -> set[int]:
    # Every parameter inside a measured layer: its weight (the parametrization's ``original`` and any
    # quantizer parameter such as a learned step), its bias, and any child quantizer. The layer's own
    # terms (N_l values, LayerQuant scales, 32-bit bias) stand for all of them.
    return {id(p) for p in module.parameters(recurse=True)}


def _ratio(num: float, den: float) -> float:
    if den:
        return float(num) / float(den)
    return 0.0 if num == 0 else math.inf


def _measure_layer(name: str, module: nn.Module, macs: int, q: LayerQuant) -> LayerCost:
    w = module.weight.detach()
    mask = to_canonical(w, module) != 0
    shape = tuple(canonical_shape(module))
    n = mask.numel()
    nz = int(mask.sum())
    bw = q.effective_weight_bits
    ba = q.effective_act_bits
    rel_bits, rel_r = best_relative(mask, value_bits=bw)
    idx = {
        "dense": 0,
        "bitmap": index_bits(mask, "bitmap"),
        "csr": index_bits(mask, "csr"),
        "relative": rel_bits,
    }
    bias = getattr(module, "bias", None)
    bias_bits = FLOAT_BITS * (bias.numel() if isinstance(bias, torch.Tensor) else 0)
    scale_bits = q.stored_scale_bits
    totals = {e: (n if e == "dense" else nz) * bw + idx[e] for e in ENCODINGS}
    encoding = min(ENCODINGS, key=lambda e: totals[e])  # min() keeps the first of equal keys
    density = nz / n if n else 0.0
    return LayerCost(
        name=name,
        kind=type_before_parametrizations(module).__name__,  # not "ParametrizedLinear"
        shape=shape,
        params=n,
        nonzeros=nz,
        density=density,
        macs=int(macs),
        weight_bits=bw,
        act_bits=ba,
        bops=(macs * nz * bw * ba) / n if n else 0.0,
        index_bits=idx,
        relative_r=rel_r,
        entropy_bits=entropy_bound_bits(n, nz),
        encoding=encoding,
        scale_bits=scale_bits,
        bias_bits=bias_bits,
        memory_bits=totals[encoding] + scale_bits + bias_bits,
    )


@torch.no_grad()
def measure(
    model: nn.Module,
    example_inputs: tuple,
    quant: Mapping[str, LayerQuant] | None = None,
    exclude: Iterable[str] = (),
    reference: ModelCost | None = None,
    macs: dict[str, int] | None = None,
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
        macs: precomputed :func:`count_macs` result, to skip the forward pass.

    Definitions:
        * ``params``: every parameter of the model, a measured layer counting ``N_l`` + its bias (see the
          module docstring for parametrization / quantizer parameters); ``prunable_params = sum N_l``;
          ``other_params`` the rest, costed ``other_bits = 32 * other_params``.
        * ``sparsity = 1 - sum nz_l / sum N_l`` over the measured layers.
        * ``memory_bits = sum_l min_encoding memory_l + other_bits``; ``memory_bits_by_encoding[e]`` is the
          same with every layer forced to ``e`` (``"best"`` == ``memory_bits``).
        * Dense fp32: ``sum MAC_l * 32 * 32`` BOPs and ``32 * params`` bits. Dense int8:
          ``sum MAC_l * 8 * 8`` BOPs and ``8 * prunable_params + 32 * (params - prunable_params)`` bits
          (no steps counted).

    >>> m = nn.Sequential(nn.Linear(4, 3, bias=False))
    >>> c = measure(m, (torch.zeros(1, 4),), quant={"0": LayerQuant(weight_bits=8, act_bits=8)})
    >>> c.macs, c.bops, c.memory_bits, c.dense_fp32_memory_bits, c.memory_ratio
    (12, 768.0, 96, 384, 0.25)
    """
    quant = dict(quant or {})
    layers = list(compressible_layers(model, exclude))
    if not layers:
        raise PrunqError(
            "model has no compressible layer (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear)"
            + (f" outside exclude={list(exclude)!r}" if exclude else "")
        )
    names = [n for n, _ in layers]
    unknown = sorted(set(quant) - set(names))
    if unknown:
        raise PrunqError(f"quant: {unknown} are not measured layers (measured: {names})")
    if macs is None:
        macs = count_macs(model, example_inputs, exclude)
    missing = [n for n in names if n not in macs]
    if missing:
        raise PrunqError(f"macs: no MAC count for layers {missing}")

    costs = [_measure_layer(n, mod, macs[n], quant.get(n, _FLOAT)) for n, mod in layers]

    layer_ids: set[int] = set()
    for _, mod in layers:
        layer_ids |= _layer_param_ids(mod)
    other_params = sum(p.numel() for p in model.parameters() if id(p) not in layer_ids)
    other_bits = FLOAT_BITS * other_params
    prunable = sum(lc.params for lc in costs)
    bias_params = sum(lc.bias_bits for lc in costs) // FLOAT_BITS
    params = prunable + bias_params + other_params
    nonzeros = sum(lc.nonzeros for lc in costs)
    total_macs = sum(lc.macs for lc in costs)
    bops = float(sum(lc.bops for lc in costs))
    by_enc = {e: sum(lc.memory_bits_as(e) for lc in costs) + other_bits for e in ENCODINGS}
    memory_bits = sum(lc.memory_bits for lc in costs) + other_bits
    by_enc["best"] = memory_bits

    if reference is not None:
        fp32_bops, fp32_mem = reference.dense_fp32_bops, reference.dense_fp32_memory_bits
        int8_bops, int8_mem = reference.dense_int8_bops, reference.dense_int8_memory_bits
    else:
        fp32_bops = total_macs * FLOAT_BITS * FLOAT_BITS
        fp32_mem = FLOAT_BITS * params
        int8_bops = total_macs * _INT8 * _INT8
        int8_mem = _INT8 * prunable + FLOAT_BITS * (params - prunable)

    return ModelCost(
        layers=costs,
        params=params,
        prunable_params=prunable,
        nonzeros=nonzeros,
        sparsity=1.0 - nonzeros / prunable if prunable else 0.0,
        macs=total_macs,
        bops=bops,
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
