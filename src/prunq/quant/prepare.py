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
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, StrictBool  # "yes" or 1 for a flag is an error, not True
from torch import nn
from torch.nn.utils import parametrize

from prunq.core import parametrize as P
from prunq.core.config import Bits, Config, MethodConfig, Percentile, TrainConfig
from prunq.core.errors import PrunqError
from prunq.core.layers import check_patterns, compressible_layers, is_compressible
from prunq.core.records import CONVERTED_BITS, CONVERTED_STEP, INPUT_QUANTIZER, PRUNED_FLAG, converted_layers  # noqa: F401  (re-exported)
from prunq.core.sharing import shared_weight_users, stored_weight
from prunq.prune.masks import get_mask, original
from prunq.quant.act import ActQuantizer
from prunq.quant.primitives import is_quantized
from prunq.quant.weight import WeightQuantizer, weight_quantizer

#: Name of the activation quantizer submodule on each compressed layer (a state-dict key prefix).
ACT_ATTR = INPUT_QUANTIZER


class LayerBits(Config):
    """A per-layer bit-width override (either key may be left out)."""

    error_prefix: ClassVar[str] = "quant.overrides"
    weight_bits: Bits | None = None
    act_bits: Bits | None = None


class QuantConfig(MethodConfig):
    """Quantization with quantization-aware fine-tuning (METHOD.md §3): the ``quantize`` method's config.

    One definition for the Python API and the recipe's ``quant:`` section (or ``methods: [{kind:
    quantize, ...}]``). ``overrides`` maps an fnmatch pattern of layer names to ``{"weight_bits": b,
    "act_bits": b}``; later patterns win. 16 or 32 bits leave that tensor in float. ``fold_bn``,
    ``calib_batches`` and ``finetune`` are what the method does around :func:`prepare` (fold batch-norm
    first, calibrate on that many training batches, fine-tune); :func:`prepare` itself reads the rest.

    >>> QuantConfig(weight_bits=2).weight_bits
    2
    >>> QuantConfig(weight_bits=12)
    Traceback (most recent call last):
    ...
    prunq.core.errors.PrunqError: quant.weight_bits: 12 is outside 2–8 (16 or 32 = not quantized)
    """

    error_prefix: ClassVar[str] = "quant"
    kind: Literal["quantize"] = "quantize"
    weight_bits: Bits = 4
    act_bits: Bits = 8
    overrides: dict[str, LayerBits] = Field(default_factory=dict)
    per_channel: StrictBool = True
    weight_init: Literal["max", "mse"] = "mse"
    act_calibration: Literal["max", "percentile", "mse"] = "percentile"
    percentile: Percentile = 99.99
    learn_step: StrictBool = True
    #: LSQ weight-step gradient scale ``1/sqrt(N * Qp)``: ``N`` = every weight of the channel ("all", the
    #: LSQ paper) or only its non-zero ones ("nonzero", default: at 98 % sparsity "all" is ~7x smaller).
    #: Measured on digits at 98-99.5 % (bench/results/lsq_n.md): tied at w4a8, +0.7 pt at w2a8.
    lsq_grad_n: Literal["all", "nonzero"] = "nonzero"
    power_of_two: StrictBool = False
    fold_bn: StrictBool = True
    exclude: tuple[str, ...] = ()
    calib_batches: int = Field(8, ge=1)
    finetune: TrainConfig = TrainConfig(steps=300, lr=2e-4)


def bits_for(config: QuantConfig, name: str) -> tuple[int, int]:
    """``(weight_bits, act_bits)`` for layer ``name`` after applying overrides (later patterns win).

    >>> bits_for(QuantConfig(overrides={"fc*": {"weight_bits": 8}, "fc2": {"act_bits": 32}}), "fc2")
    (8, 32)
    """
    wb, ab = config.weight_bits, config.act_bits
    for pattern, bits in config.overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            wb = bits.weight_bits if bits.weight_bits is not None else wb
            ab = bits.act_bits if bits.act_bits is not None else ab
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


def quant_plan(model: nn.Module, config: QuantConfig) -> dict[str, dict[str, Any]]:
    """Per layer, the quantizers :func:`prepare` will attach: ``{name: {"weight": meta | None, "act": meta |
    None}}`` with ``meta`` = ``{"bits", "per_channel", "power_of_two"}`` — what the manifest's ``quantize``
    transform records and :func:`prepare_layers` replays. Layers whose bits are both float are left out.
    """
    check_patterns(model, config.exclude, "quant.exclude")
    check_patterns(model, config.overrides, "quant.overrides")
    plan: dict[str, dict[str, Any]] = {}
    for name, _ in compressible_layers(model, config.exclude):
        wb, ab = bits_for(config, name)
        w = {"bits": wb, "per_channel": config.per_channel, "power_of_two": config.power_of_two} if is_quantized(wb) else None
        a = {"bits": ab, "power_of_two": config.power_of_two} if is_quantized(ab) else None
        if w is not None or a is not None:
            plan[name] = {"weight": w, "act": a}
    return plan


def prepare(model: nn.Module, config: QuantConfig) -> dict[str, tuple[int, int]]:
    """Attach weight and input-activation fake-quantizers to every compressible layer not excluded.

    Weight: a :class:`WeightQuantizer` parametrization after any mask (when weight bits <= 8).
    Input: an :class:`ActQuantizer` submodule ``input_quantizer`` plus a forward pre-hook (when
    act bits <= 8). Activation quantizers must be calibrated (:func:`calibrate`) before a forward.
    Returns ``{layer name: (weight_bits, act_bits)}`` for every compressible layer not excluded; the
    structure depends only on the model's structure and ``config``, so a saved ``state_dict`` loads into
    another prepared copy.
    """
    result = {name: bits_for(config, name) for name, _ in compressible_layers(model, config.exclude)}
    prepare_layers(model, quant_plan(model, config), config)
    return result


def _per_channel(meta: dict[str, Any]) -> bool:
    # A plan says per_channel; a QParams record (the manifest) says axis (None = per tensor).
    return bool(meta["per_channel"]) if "per_channel" in meta else meta.get("axis") is not None


def _loaded(module: nn.Module, incompatible: Any) -> None:
    module.needs_init = False


def prepare_layers(model: nn.Module, plan: dict[str, dict[str, Any]], config: QuantConfig | None = None) -> None:
    """Attach the quantizers of a :func:`quant_plan` (also how ``prunq.load`` replays a ``quantize``
    transform). ``config`` supplies the initialisation and calibration options (default: the defaults;
    a loaded state dict overrides the steps anyway)."""
    config = config or QuantConfig()
    modules = dict(model.named_modules())
    shared = shared_weight_users(model)
    made: dict[int, WeightQuantizer] = {}  # stored Parameter -> its one quantizer
    for name, spec in plan.items():
        module = modules.get(name)
        if module is None or not is_compressible(module):
            raise PrunqError(f"quant: layer {name!r} is not a compressible layer of the model")
        if weight_quantizer(module) is not None or act_quantizer(module) is not None:
            raise PrunqError(f"quant: layer {name!r} is already prepared; call unprepare(model) first")
        w, a = spec.get("weight"), spec.get("act")
        if w is not None:
            key = id(stored_weight(module))
            q = made.get(key)
            if q is None:
                q = WeightQuantizer(
                    module, int(w["bits"]), _per_channel(w), config.weight_init, config.learn_step,
                    bool(w.get("power_of_two", False)), grad_n=config.lsq_grad_n,
                )  # fmt: skip
                # calibrate() initialises a step once, never a learned or loaded one again: loading a state
                # dict into the quantizer (resuming QAT, prunq.load) counts as initialising it.
                q.needs_init = True
                q.register_load_state_dict_post_hook(_loaded)
                made[key] = q
                # A tensor shared with other modules (a tied embedding) is quantized once, consistently:
                # every user gets this same quantizer, so all of them see Q(mask * W) and convert() bakes
                # one grid into the one Parameter.
                for other_name, other in shared.get(key, []):
                    if other is module or other_name in plan:
                        continue
                    if tuple(other.weight.shape) != tuple(module.weight.shape):
                        raise PrunqError(f"quant: {name!r} shares its weight with {other_name!r} in another layout")
                    parametrize.register_parametrization(other, "weight", q)
            elif (q.bits, q.per_channel, q.power_of_two) != (
                int(w["bits"]), _per_channel(w), bool(w.get("power_of_two", False))
            ):
                raise PrunqError(
                    f"quant: {name!r} shares its weight with another layer quantized differently; "
                    "give every user of a shared weight the same weight bits"
                )
            parametrize.register_parametrization(module, "weight", q)
        if a is not None:
            aq = ActQuantizer(
                int(a["bits"]), config.act_calibration, config.percentile, config.learn_step,
                bool(a.get("power_of_two", False)),
            )  # fmt: skip
            setattr(module, ACT_ATTR, aq.to(device=original(module).device))
            module.register_forward_pre_hook(_quantize_input)


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
    *,
    reinit_weights: bool = False,
) -> None:
    """Initialise weight steps from the current weights and calibrate every activation quantizer.

    A weight step is initialised once, the first time the model is calibrated after :func:`prepare`;
    calling ``calibrate`` again (e.g. to re-range activations after QAT) keeps learned weight steps
    unless ``reinit_weights=True``.

    Runs ``forward_fn(model, batch)`` (default ``model(batch)``, or ``model(*batch)`` for a tuple)
    for each batch under ``no_grad`` in eval mode, then restores each module's train/eval mode.
    Raises :class:`PrunqError` if a quantized layer saw no input.
    """
    forward_fn = forward_fn or _default_forward
    for name, module in model.named_modules():
        wq = weight_quantizer(module) if is_compressible(module) else None
        if wq is not None and (reinit_weights or getattr(wq, "needs_init", False)):
            wq.init_from(quantizer_input(module))
            wq.needs_init = False
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
        _remove_weight_quantizer(module)  # also on a module that only shares a quantized weight
        if not is_compressible(module):
            continue
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _quantize_input:
                del module._forward_pre_hooks[key]
        if act_quantizer(module) is not None:
            delattr(module, ACT_ATTR)


def _remove_weight_quantizer(module: nn.Module) -> None:
    wq = weight_quantizer(module)
    if wq is None:
        return
    plist = module.parametrizations["weight"]
    others = [p for p in plist if p is not wq]
    # parametrize cannot drop one entry of the list: remove all (the original Parameter object comes
    # back unchanged, so optimizers stay valid) and re-register the others (masks) in order.
    P.remove(module, "weight", leave_parametrized=False)
    for p in others:
        parametrize.register_parametrization(module, "weight", p)


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Bake masks and weight quantizers into plain weights, for inference and export (in place).

    Every compressed weight becomes a plain Parameter holding ``Q(mask * W)``: exact zeros where
    pruned, every value an integer multiple of its step. The grid stays in the state dict as buffers
    ``weight_step`` (one per output channel, canonical order) and ``weight_bits``, so ``prunq.load``, the
    cost model and the exporters read the same record (:func:`prunq.core.records.layer_record`).
    Activation quantizers stay active, their steps set to the value the forward uses (clamped, rounded
    to a power of two when asked: same outputs). Irreversible. A copy made with ``copy.deepcopy`` can be converted
    without touching the original.

    >>> m = nn.Sequential(nn.Linear(4, 3))
    >>> _ = prepare(m, QuantConfig(weight_bits=2, act_bits=8))
    >>> calibrate(m, [torch.rand(2, 4)])
    >>> _ = convert(m)
    >>> len(set(m[0].weight.abs().flatten().tolist()) - {0.0}) <= 3, int(m[0].weight_bits)
    (True, 2)
    """
    for _, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module, "weight"):
            continue
        wq = weight_quantizer(module)
        masked = get_mask(module) is not None
        if wq is None and not masked:
            continue  # someone else's parametrization: not ours to bake
        if wq is not None:
            step = wq.effective_step().detach().reshape(-1).clone()
            bits = wq.bits
        P.remove(module, "weight", leave_parametrized=True)
        if masked:  # the baked zeros are pruned weights: sparsity still counts this layer as prunable
            setattr(module, PRUNED_FLAG, True)
        if wq is not None and is_compressible(module):
            module.register_buffer(CONVERTED_STEP, step)
            module.register_buffer(CONVERTED_BITS, torch.tensor(bits, dtype=torch.int64, device=step.device))
    for module in model.modules():  # activation steps hold the value the forward uses (clamped, 2^k rounded)
        if isinstance(module, ActQuantizer) and bool(module.calibrated):
            with torch.no_grad():
                module.step.copy_(module.effective_step())
    return model
