"""Per-layer compression records: the single source the cost model (and later the exporters) read.

A record is what a compressed layer *is*: its effective weight (canonical layout), its mask, the
:class:`~prunq.core.qparams.QParams` of its weight and of its input activation, its bias. It is read
from the modules' own state — the mask and quantizer parametrizations, the buffers ``convert()`` leaves,
or, for a module swapped for another implementation, the module's ``prunq_record(name)`` method — so
nothing downstream re-derives bits from a weight tensor or an untyped dict.

This is the lowest layer: it knows parametrizations by duck typing (a parametrization with a ``mask``
buffer is a mask, one with ``qparams()`` a weight quantizer), never by importing prune/ or quant/.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import type_before_parametrizations

from prunq.core.layers import is_compressible, matches, stored_weight, to_canonical
from prunq.core.qparams import QParams

#: The activation quantizer of a compressed layer's input: a child module of this name.
INPUT_QUANTIZER = "input_quantizer"
#: Buffers ``convert()`` leaves on a layer: the weight steps (canonical dim 0) and the bit-width.
CONVERTED_STEP = "weight_step"
CONVERTED_BITS = "weight_bits"
#: Attribute ``convert()`` sets on a layer whose mask it baked (its zeros are pruned weights).
PRUNED_FLAG = "prunq_pruned"


@dataclass
class LayerRecord:
    """One compressed layer as the cost model and the exporters see it.

    ``weight`` is the effective weight (masked and quantized, as the forward pass uses it) in the
    canonical layout ``(out, in_per_group, *kernel)``; ``mask`` the canonical keep-mask when the layer is
    pruned (``None``: not masked; zeros of ``weight`` still count as zeros). ``stored_id`` identifies the
    stored Parameter, so a tensor shared by two layers is stored (and costed in memory) once.
    """

    name: str
    kind: str
    weight: torch.Tensor
    mask: torch.Tensor | None
    weight_q: QParams | None
    act_q: QParams | None
    bias: torch.Tensor | None
    stored_id: int
    #: the layer is pruned (carries a mask, or had one baked by ``convert()``): its weights count toward
    #: the sparsity over prunable weights
    pruned: bool = False

    @property
    def shape(self) -> tuple[int, ...]:  # noqa: D102
        return tuple(self.weight.shape)

    @property
    def params(self) -> int:
        """``N_l``: weights in the layer."""
        return self.weight.numel()

    @property
    def fan_in(self) -> int:
        """Weights per output element (``in_per_group * prod(kernel)``)."""
        return math.prod(self.weight.shape[1:]) if self.weight.dim() > 1 else 1

    @property
    def weight_bits(self) -> int:
        """Bits of a stored weight value: the quantizer's, else 32 (float)."""
        return self.weight_q.bits if self.weight_q is not None else 32

    @property
    def act_bits(self) -> int:
        """Bits of an input activation in a multiply: the input quantizer's, else 32 (float)."""
        return self.act_q.bits if self.act_q is not None else 32


def _weight_parts(module: nn.Module) -> tuple[torch.Tensor | None, QParams | None]:
    """(raw mask, weight QParams) from the parametrizations, or from ``convert()``'s buffers."""
    mask = None
    wq = None
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations["weight"]:
            if wq is None and callable(getattr(p, "qparams", None)):
                wq = p.qparams()
            elif mask is None and isinstance(getattr(p, "mask", None), torch.Tensor):
                mask = p.mask
    step = getattr(module, CONVERTED_STEP, None)
    bits = getattr(module, CONVERTED_BITS, None)
    if wq is None and isinstance(step, torch.Tensor) and bits is not None:
        s = step.detach().reshape(-1)
        pow2 = bool(torch.equal(s, torch.exp2(torch.round(torch.log2(s)))))
        wq = QParams(int(bits), s, axis=0 if s.numel() > 1 else None, signed=True, narrow=True, power_of_two=pow2)
    return mask, wq


def layer_record(name: str, module: nn.Module) -> LayerRecord:
    """The record of one layer: a compressible torch layer, or a module with ``prunq_record(name)``."""
    own = getattr(module, "prunq_record", None)
    if callable(own):
        return own(name)
    raw_mask, wq = _weight_parts(module)
    aq_mod = getattr(module, INPUT_QUANTIZER, None)
    aq = aq_mod.qparams() if aq_mod is not None and callable(getattr(aq_mod, "qparams", None)) else None
    with torch.no_grad():
        w = to_canonical(module.weight.detach(), module)
        mask = None if raw_mask is None else to_canonical(raw_mask, module) != 0
    bias = getattr(module, "bias", None)
    return LayerRecord(
        name=name,
        kind=type_before_parametrizations(module).__name__,
        weight=w,
        mask=mask,
        weight_q=wq,
        act_q=aq,
        bias=bias.detach() if isinstance(bias, torch.Tensor) else None,
        stored_id=id(stored_weight(module)),
        pruned=mask is not None or bool(getattr(module, PRUNED_FLAG, False)),
    )


def is_recorded(module: nn.Module) -> bool:
    """True for the layers the cost model measures: compressible torch layers and ``prunq_record`` modules."""
    return is_compressible(module) or callable(getattr(module, "prunq_record", None))


def recorded_layers(model: nn.Module, exclude: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every recorded layer not excluded by name pattern (model order)."""
    exclude = list(exclude)
    return [(n, m) for n, m in model.named_modules() if is_recorded(m) and not matches(n, exclude)]


def layer_records(model: nn.Module, exclude: Iterable[str] = ()) -> list[LayerRecord]:
    """The records of every recorded layer of ``model`` (see :func:`layer_record`)."""
    return [layer_record(n, m) for n, m in recorded_layers(model, exclude)]


def converted_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The ``weight_step`` / ``weight_bits`` buffers :func:`convert` left: ``{name: {"bits", "steps"}}``
    (what the manifest's ``convert`` transform records so that ``prunq.load`` registers the buffers)."""
    out = {}
    for name, module in model.named_modules():
        step = getattr(module, CONVERTED_STEP, None)
        if is_compressible(module) and isinstance(step, torch.Tensor):
            out[name] = {"bits": int(getattr(module, CONVERTED_BITS)), "steps": int(step.numel())}
    return out


def record_conversion(manifest: dict[str, Any], model: nn.Module) -> None:
    """Append a ``convert`` transform to ``manifest`` (in place) when ``model`` was converted after the run
    (``prunq.convert``) and the manifest does not say so yet: the layers it baked with their grids, or none
    for masks alone (their replay must still bake them before the weights load)."""
    transforms = manifest.setdefault("transforms", [])
    ops = {t.get("op") for t in transforms}
    if "convert" in ops:
        return
    converted = converted_layers(model)
    baked = bool(ops & {"mask", "quantize", "quantize_config"}) and not any(
        parametrize.is_parametrized(m) for m in model.modules()
    )
    if converted or baked:
        transforms.append({"op": "convert", "layers": converted})
