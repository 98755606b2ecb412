"""The ``quantize`` method (stage 2 of the two-stage pipeline): fold batch-norm, attach quantizers,
calibrate, quantization-aware fine-tune. Masks are frozen (hard): pruned weights stay exactly zero.

Records ``fold_bn`` (the folded pairs) and ``quantize`` (per layer, the weight and activation grids:
bits, per-channel, power-of-two), replayed by ``prunq.load`` before the state dict (steps) is loaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from prunq.core.manifest import register_transform
from prunq.core.method import MethodBase, RunContext, Transform, register_method
from prunq.prune import masks as M
from prunq.quant import fold
from prunq.quant.prepare import QuantConfig, calibrate, convert, converted_layers, prepare, prepare_layers, quant_plan
from prunq.core.records import layer_records

#: Seed offset of the calibration batches (kept from the two-stage pipeline, so results reproduce).
CALIB_SEED = 104729


def calibration_batches(task: Any, config: QuantConfig, batch_size: int, seed: int) -> list:
    """The training batches the quantize method calibrates on (``calib_batches`` of them, a seed of their own)."""
    return task.calibration_batches(config.calib_batches, batch_size, seed=seed + CALIB_SEED)


@register_method(QuantConfig)
class QuantizeMethod(MethodBase):
    """Fold, prepare, calibrate; the fine-tuning is the runner's ``fit`` with this config's ``finetune``."""

    stage = "quant"
    config: QuantConfig

    def attach(self, model: nn.Module, ctx: RunContext) -> None:  # noqa: D102
        cfg = self.config
        M.set_soft(model, False)  # masks are frozen in stage 2: pruned weights get no update
        self.pairs: list[tuple[str, str]] = []
        if cfg.fold_bn:
            self.pairs = fold.find_conv_bn_pairs(model, ctx.example_inputs)
            fold.fold_bn_(model, self.pairs)
        self.plan = quant_plan(model, cfg)
        prepare_layers(model, self.plan, cfg)
        task = ctx.task
        calibrate(model, calibration_batches(task, cfg, ctx.batch_size, ctx.seed), lambda m, b: task.loss(m, b))

    def state_dict(self) -> dict[str, Any]:
        """Nothing outside the model: the quantizers' steps are parameters of the model."""
        return {}

    def finalize(self, model: nn.Module, ctx: RunContext) -> list[Transform]:  # noqa: D102
        out = []
        if self.pairs:
            out.append(Transform("fold_bn", {"pairs": [list(p) for p in self.pairs]}))
        out.append(Transform("quantize", {"layers": quantize_record(model, self.plan)}))
        return out


def quantize_record(model: nn.Module, plan: dict[str, Any]) -> dict[str, Any]:
    """The ``quantize`` transform's per-layer entries, read from the quantizers themselves: each layer's
    weight and input-activation :class:`~prunq.core.qparams.QParams` without the step values (which the
    state dict holds) — the same records the cost model and the exporters read."""
    records = {r.name: r for r in layer_records(model)}
    return {
        name: {
            "weight": records[name].weight_q.to_meta() if records[name].weight_q is not None else None,
            "act": records[name].act_q.to_meta() if records[name].act_q is not None else None,
        }
        for name in plan
    }


@register_transform("fold_bn")
def _replay_fold(model: nn.Module, entry: dict[str, Any]) -> None:
    fold.fold_bn_(model, [tuple(p) for p in entry["pairs"]])


@register_transform("quantize")
def _replay_quantize(model: nn.Module, entry: dict[str, Any]) -> None:
    """Attach the recorded quantizers. Their steps are initialised by max (cheap), not by the default MSE
    search (milliseconds a layer): the state dict loaded next overwrites every step anyway."""
    from prunq.quant.weight import WeightQuantizer

    default = QuantConfig()
    prepare_layers(model, entry["layers"], default.replace(weight_init="max"))
    for q in model.modules():
        if isinstance(q, WeightQuantizer):
            q.init = default.weight_init  # as if built with the defaults (a later init_from uses it)


@register_transform("quantize_config")
def _replay_quantize_config(model: nn.Module, entry: dict[str, Any]) -> None:
    """Format-1 manifests recorded one QuantConfig for the whole model."""
    prepare(model, QuantConfig.parse(entry["config"], "config"))


@register_transform("convert")
def _replay_convert(model: nn.Module, entry: dict[str, Any]) -> None:
    """Weights baked by ``convert()``: bake the replayed structure the same way (the state dict then
    holds the baked weights and each layer's ``weight_step`` / ``weight_bits``)."""
    convert(model)
    got = converted_layers(model)
    want = entry["layers"]
    if set(got) != set(want) or any(got[n] != want[n] for n in want):
        raise ValueError("the converted layers differ from the recorded ones")
