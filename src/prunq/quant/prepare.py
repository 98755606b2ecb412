"""Quantization-aware fine-tuning set-up: config, prepare, calibrate, unprepare, per-layer summary.

>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
>>> prepare(model, QuantConfig(weight_bits=4, act_bits=8, overrides={"3": {"weight_bits": 8}}))
{'0': (4, 8), '3': (8, 8)}
>>> calibrate(model, [torch.randn(8, 1, 4, 4)])
>>> model(torch.randn(2, 1, 4, 4)).shape
torch.Size([2, 2])

Masks must be attached *before* :func:`prepare` (``prunq.prune.masks.attach_mask`` refuses a weight that
already has parametrizations), so the weight quantizer comes second: ``W_eff = Q(mask * W)``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunq.core.errors import PrunqError
from prunq.core.layers import compressible_layers, is_compressible
from prunq.prune.masks import original
from prunq.quant.act import CALIBRATIONS, ActQuantizer
from prunq.quant.primitives import check_bits, is_quantized
from prunq.quant.weight import WEIGHT_INITS, WeightQuantizer, weight_quantizer

#: Name of the activation quantizer submodule on each compressed layer (a state-dict key prefix).
ACT_ATTR = "input_quantizer"
_OVERRIDE_KEYS = ("weight_bits", "act_bits")


@dataclass(frozen=True)
class QuantConfig:
    """What :func:`prepare` quantizes and how (METHOD.md §3). Validated on construction.

    ``overrides`` maps an fnmatch pattern of layer names to ``{"weight_bits": b, "act_bits": b}``
    (either key may be left out); later patterns win. 16 or 32 bits leave that tensor in float.
    """

    weight_bits: int = 4
    act_bits: int = 8
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)
    per_channel: bool = True
    weight_init: str = "max"
    act_calibration: str = "percentile"
    percentile: float = 99.99
    learn_step: bool = True
    power_of_two: bool = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "quant.weight_bits")
        check_bits(self.act_bits, "quant.act_bits")
        if not isinstance(self.overrides, dict):
            raise PrunqError(f"quant.overrides: expected a mapping pattern -> bits, got {type(self.overrides).__name__}")
        for pattern, bits in self.overrides.items():
            where = f"quant.overrides[{pattern!r}]"
            if not isinstance(pattern, str) or not isinstance(bits, dict):
                raise PrunqError(f"{where}: expected a name pattern mapped to {{'weight_bits': b, 'act_bits': b}}")
            for key, value in bits.items():
                if key not in _OVERRIDE_KEYS:
                    raise PrunqError(f"{where}: unknown key {key!r} (expected one of {_OVERRIDE_KEYS})")
                check_bits(value, f"{where}.{key}")
        if self.weight_init not in WEIGHT_INITS:
            raise PrunqError(f"quant.weight_init: {self.weight_init!r} is not one of {WEIGHT_INITS}")
        if self.act_calibration not in CALIBRATIONS:
            raise PrunqError(f"quant.act_calibration: {self.act_calibration!r} is not one of {CALIBRATIONS}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) or not 0 < self.percentile <= 100:
            raise PrunqError(f"quant.percentile: {self.percentile!r} is outside (0, 100]")
        if isinstance(self.exclude, str):
            raise PrunqError("quant.exclude: expected a list of name patterns, got a single string")
        if not all(isinstance(p, str) for p in self.exclude):
            raise PrunqError("quant.exclude: every entry must be a name pattern (string)")
        object.__setattr__(self, "exclude", tuple(self.exclude))  # a YAML list becomes a tuple


def bits_for(config: QuantConfig, name: str) -> tuple[int, int]:
    """``(weight_bits, act_bits)`` for layer ``name`` after applying overrides (later patterns win).

    >>> bits_for(QuantConfig(overrides={"fc*": {"weight_bits": 8}, "fc2": {"act_bits": 32}}), "fc2")
    (8, 32)
    """
    wb, ab = config.weight_bits, config.act_bits
    for pattern, bits in config.overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            wb = bits.get("weight_bits", wb)
            ab = bits.get("act_bits", ab)
    return wb, ab


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: quantize the first positional input with ``module.input_quantizer``.

    A module-level function (not a closure), so hooks survive ``deepcopy`` and are found by identity
    in :func:`unprepare`.
    """
    if not args:
        return args
    return (getattr(module, ACT_ATTR)(args[0]), *args[1:])


def act_quantizer(module: nn.Module) -> ActQuantizer | None:
    """The :class:`ActQuantizer` on ``module``'s input, or ``None``."""
    q = getattr(module, ACT_ATTR, None)
    return q if isinstance(q, ActQuantizer) else None


def quantizer_input(module: nn.Module) -> torch.Tensor:
    """What the weight quantizer sees: the stored weight through every parametrization before it."""
    plist = module.parametrizations["weight"]
    w = plist.original
    for p in plist:
        if isinstance(p, WeightQuantizer):
            break
        w = p(w)
    return w


def prepare(model: nn.Module, config: QuantConfig) -> dict[str, tuple[int, int]]:
    """Attach weight and input-activation fake-quantizers to every compressible layer not excluded.

    Weight: a :class:`WeightQuantizer` parametrization after any mask (when weight bits <= 8).
    Input: an :class:`ActQuantizer` submodule ``input_quantizer`` plus a forward pre-hook (when
    act bits <= 8). Activation quantizers must be calibrated (:func:`calibrate`) before a forward.
    Returns ``{layer name: (weight_bits, act_bits)}``; the structure depends only on the model's
    structure and ``config``, so a saved ``state_dict`` loads into another prepared copy.
    """
    result: dict[str, tuple[int, int]] = {}
    for name, module in compressible_layers(model, config.exclude):
        if weight_quantizer(module) is not None or act_quantizer(module) is not None:
            raise PrunqError(f"quant: layer {name!r} is already prepared; call unprepare(model) first")
        wb, ab = bits_for(config, name)
        if is_quantized(wb):
            q = WeightQuantizer(module, wb, config.per_channel, config.weight_init, config.learn_step, config.power_of_two)
            parametrize.register_parametrization(module, "weight", q)
        if is_quantized(ab):
            aq = ActQuantizer(ab, config.act_calibration, config.percentile, config.learn_step, config.power_of_two)
            setattr(module, ACT_ATTR, aq.to(device=original(module).device))
            module.register_forward_pre_hook(_quantize_input)
        result[name] = (wb, ab)
    return result


def quantizer_modules(model: nn.Module) -> Iterator[tuple[str, WeightQuantizer | ActQuantizer]]:
    """``(qualified name, quantizer)`` for every weight and activation quantizer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, (WeightQuantizer, ActQuantizer)):
            yield name, m


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> None:
    """Initialise weight steps from the current weights and calibrate every activation quantizer.

    Runs ``forward_fn(model, batch)`` (default ``model(batch)``, or ``model(*batch)`` for a tuple)
    for each batch under ``no_grad`` in eval mode, then restores each module's train/eval mode.
    Raises :class:`PrunqError` if a quantized layer saw no input.
    """
    forward_fn = forward_fn or _default_forward
    for name, module in model.named_modules():
        wq = weight_quantizer(module) if is_compressible(module) else None
        if wq is not None:
            wq.init_from(quantizer_input(module))
    acts = [(n, m) for n, m in quantizer_modules(model) if isinstance(m, ActQuantizer)]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for _, q in acts:
            q.observe()
        with torch.no_grad():
            for batch in batches:
                forward_fn(model, batch)
        for name, q in acts:
            if q.observed_calls == 0:
                layer = name.rsplit(".", 1)[0] if "." in name else ""
                raise PrunqError(f"quant.calibrate: layer {layer!r} received no input from the calibration batches")
            q.finish_calibration()
    finally:
        for _, q in acts:
            q.stop_observing()  # a no-op after finish_calibration; cleans up after an error
        for m, training in modes.items():
            m.training = training


def unprepare(model: nn.Module) -> None:
    """Remove activation quantizers, their hooks and weight-quantizer parametrizations (masks stay)."""
    for _, module in list(model.named_modules()):
        if not is_compressible(module):
            continue
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _quantize_input:
                del module._forward_pre_hooks[key]
        if act_quantizer(module) is not None:
            delattr(module, ACT_ATTR)
        _remove_weight_quantizer(module)


def _remove_weight_quantizer(module: nn.Module) -> None:
    wq = weight_quantizer(module)
    if wq is None:
        return
    plist = module.parametrizations["weight"]
    others = [p for p in plist if p is not wq]
    # parametrize cannot drop one entry of the list: remove all (the original Parameter object comes
    # back unchanged, so optimizers stay valid) and re-register the others (masks) in order.
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    for p in others:
        parametrize.register_parametrization(module, "weight", p)


def layer_quant(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per compressible layer: ``weight_bits``, ``act_bits`` (32 = float), ``weight_scales`` (number
    of weight steps), ``act_scales`` (0 or 1) and ``power_of_two`` -- the input of the cost model."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in compressible_layers(model):
        wq, aq = weight_quantizer(module), act_quantizer(module)
        baked = getattr(module, CONVERTED_STEP, None) if wq is None else None  # after convert()
        out[name] = {
            "weight_bits": wq.bits if wq else (int(module.weight_bits) if baked is not None else 32),
            "act_bits": aq.bits if aq else 32,
            "weight_scales": wq.step.numel() if wq else (baked.numel() if baked is not None else 0),
            "act_scales": 1 if aq else 0,
            "power_of_two": bool((wq and wq.power_of_two) or (aq and aq.power_of_two)),
        }
    return out


CONVERTED_STEP = "weight_step"


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Bake masks and weight quantizers into plain weights, for inference and export (in place).

    Every compressed weight becomes a plain Parameter holding ``Q(mask * W)``: exact zeros where
    pruned, every value an integer multiple of its step. The step is kept as a buffer ``weight_step``
    (one per output channel, canonical order) with ``weight_bits`` as an attribute, so export and the
    cost model still know the grid. Activation quantizers stay active. Irreversible.

    >>> m = nn.Sequential(nn.Linear(4, 3))
    >>> _ = prepare(m, QuantConfig(weight_bits=2, act_bits=8))
    >>> calibrate(m, [torch.rand(2, 4)])
    >>> _ = convert(m)
    >>> len(set(m[0].weight.abs().flatten().tolist()) - {0.0}) <= 3
    True
    """
    for _, module in list(model.named_modules()):
        if not is_compressible(module) or not parametrize.is_parametrized(module, "weight"):
            continue
        wq = weight_quantizer(module)
        if wq is not None:
            step = wq.effective_step().detach().reshape(-1).clone()
            bits = wq.bits
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        if wq is not None:
            module.register_buffer(CONVERTED_STEP, step)
            module.weight_bits = bits
    return model
