"""The two-stage pipeline: dense evaluation -> stage 1 (score, prune, fine-tune) -> stage 2 (fold,
calibrate, quantization-aware fine-tune) -> final evaluation, measured by the cost model."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunq import __version__
from prunq.cost import measure as C
from prunq.prune import masks as M
from prunq import quant as Q
from prunq.prune.pruner import PruneConfig, Pruner
from prunq.pipeline.recipes import PruneSpec, QuantSpec, Recipe, load_recipe, parse_recipe
from prunq.tasks.base import Task
from prunq.pipeline.training import fit


@dataclass
class StageResult:
    """What a stage leaves behind: the model, its metric and extra metrics, and its log."""

    model: nn.Module
    metric: float
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class CompressResult:
    """The output of :func:`compress`: the compressed model, the metrics (METHOD.md §5) and a manifest
    that rebuilds the model's structure (masks, folded batch-norms, quantizers) for :func:`prunq.load`."""

    model: nn.Module
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    history: list[dict]
    previews: dict[str, Any] = field(default_factory=dict)
    dense_state: dict[str, Any] | None = None  # the dense weights, when the run trained them


def as_recipe(recipe: Recipe | dict | str | Path | None) -> Recipe:
    """Accept a Recipe, a mapping, or a path to a YAML file."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    return load_recipe(recipe)


def evaluate_metric(task: Task, model: nn.Module) -> tuple[float, dict[str, Any]]:
    """``(headline metric, the task's other metrics)`` on the test split."""
    out = dict(task.evaluate(model))
    metric = float(out.pop("metric"))
    return metric, out


def prune_config(spec: PruneSpec, seed: int) -> PruneConfig:
    """The library config for a recipe's ``prune`` section."""
    return PruneConfig(
        sparsity=spec.sparsity, criterion=spec.criterion, granularity=spec.granularity,
        allocation=spec.allocation, mode=spec.mode, schedule=spec.schedule, begin=spec.begin, end=spec.end,
        iterations=spec.iterations, frequency=spec.frequency, initial_sparsity=spec.initial_sparsity,
        min_density=spec.min_density, min_per_channel=spec.min_per_channel, exclude=tuple(spec.exclude),
        overrides=dict(spec.overrides), ema=spec.ema, regrow=spec.regrow, cost_exponent=spec.cost_exponent,
        seed=seed,
    )  # fmt: skip


def quant_config(spec: QuantSpec) -> Q.QuantConfig:
    """The library config for a recipe's ``quant`` section."""
    overrides = {
        pat: {k: v for k, v in bits.model_dump().items() if v is not None} for pat, bits in spec.overrides.items()
    }
    return Q.QuantConfig(
        weight_bits=spec.weight_bits, act_bits=spec.act_bits, overrides=overrides, per_channel=spec.per_channel,
        weight_init=spec.weight_init, act_calibration=spec.act_calibration, percentile=spec.percentile,
        learn_step=spec.learn_step, power_of_two=spec.power_of_two, exclude=tuple(spec.exclude),
    )  # fmt: skip


def run_prune(model: nn.Module, task: Task, recipe: Recipe, *, history: list[dict], quiet: bool = False) -> StageResult:
    """Stage 1 on ``model`` (in place): masks attached, scored, cut on schedule, fine-tuned, frozen."""
    t0 = time.perf_counter()
    spec = recipe.prune
    steps = spec.finetune.steps
    macs = C.count_macs(model, task.example_inputs()) if spec.cost_exponent > 0 else None
    pruner = Pruner(model, prune_config(spec, recipe.seed), total_steps=steps, macs=macs)
    bs = recipe.task.batch_size
    if pruner.criterion.needs_grad and spec.score_batches > 0:
        # Scores for the first cut come from a dedicated pass over training batches (no update).
        was = model.training
        model.train()
        for batch in task.calibration_batches(spec.score_batches, bs, seed=recipe.seed + 7919):
            model.zero_grad(set_to_none=True)
            task.loss(model, batch).backward()
            pruner.accumulate()
        model.zero_grad(set_to_none=True)
        model.train(was)

    def after_step(t: int) -> dict | None:
        # Every cut is logged with its sparsity; the metric only every `eval_every` steps (evaluating at
        # each cut cost the stereo recipe over a minute for 45 extra points on the curve).
        cut = pruner.step()
        entry: dict[str, Any] = {} if cut is None else {"sparsity": cut}
        if recipe.eval_every and (t + 1) % recipe.eval_every == 0:
            entry.update(metric=evaluate_metric(task, model)[0], sparsity=pruner.sparsity())
        return entry or None

    fit(
        model, task, spec.finetune, batch_size=bs, seed=recipe.seed + 1, stage="prune",
        after_backward=pruner.accumulate, after_step=after_step, history=history, quiet=quiet,
    )  # fmt: skip
    if not pruner.frozen:  # no fine-tuning budget, or a schedule that ends after it: cut now
        pruner.prune(spec.sparsity)
        pruner.freeze()
    metric, extra = evaluate_metric(task, model)
    history.append({"stage": "prune", "step": steps, "metric": metric, "sparsity": pruner.sparsity()})
    extra["sparsity"] = pruner.sparsity()
    return StageResult(model, metric, extra, time.perf_counter() - t0)


def quant_calibration_batches(task: Task, recipe: Recipe) -> list:
    """The training batches stage 2 calibrates on (``quant.calib_batches`` of them, a seed of their own)."""
    return task.calibration_batches(recipe.quant.calib_batches, recipe.task.batch_size, seed=recipe.seed + 104729)


def run_quant(
    model: nn.Module, task: Task, recipe: Recipe, *, history: list[dict], quiet: bool = False
) -> tuple[StageResult, list[tuple[str, str]]]:
    """Stage 2 on ``model`` (in place): fold batch-norm, attach quantizers, calibrate, QAT."""
    t0 = time.perf_counter()
    spec = recipe.quant
    M.set_soft(model, False)  # masks are frozen in stage 2: pruned weights get no update
    pairs: list[tuple[str, str]] = []
    if spec.fold_bn:
        pairs = Q.find_conv_bn_pairs(model, task.example_inputs())
        Q.fold_bn_(model, pairs)
    Q.prepare(model, quant_config(spec))
    bs = recipe.task.batch_size
    Q.calibrate(model, quant_calibration_batches(task, recipe), lambda m, b: task.loss(m, b))
    fit(model, task, spec.finetune, batch_size=bs, seed=recipe.seed + 2, stage="quant", history=history, quiet=quiet)
    metric, extra = evaluate_metric(task, model)
    history.append({"stage": "quant", "step": spec.finetune.steps, "metric": metric})
    return StageResult(model, metric, extra, time.perf_counter() - t0), pairs


def stage_cost(model: nn.Module, task: Task, reference: C.ModelCost | None, exclude=()) -> C.ModelCost:
    """The cost model on ``model`` as it stands, with the bit-widths its quantizers (if any) declare."""
    quant = {
        name: C.LayerQuant(
            weight_bits=info["weight_bits"],
            act_bits=info["act_bits"],
            weight_scales=info["weight_scales"],
            act_scales=info["act_scales"],
            scale_bits=8 if info.get("power_of_two") else 32,
        )  # a power-of-two step is stored as its exponent
        for name, info in Q.layer_quant(model).items()
    }
    return C.measure(model, task.example_inputs(), quant=quant, exclude=exclude, reference=reference)


def _extras(stage: StageResult) -> dict[str, Any]:
    return {k: v for k, v in stage.extra.items() if k != "sparsity"}


def _most_common(values: list[int]) -> int:
    return max(set(values), key=values.count) if values else 32


def build_metrics(
    task: Task,
    dense: StageResult,
    dense_cost: C.ModelCost,
    pruned: StageResult,
    compressed: StageResult,
    final_cost: C.ModelCost,
    history: list[dict],
    timing: dict[str, float],
    pruned_cost: C.ModelCost | None = None,
) -> dict[str, Any]:
    """The ``metrics.json`` document (METHOD.md §5), plus per-layer encodings and stage timings."""
    layers = [lc.to_dict() for lc in final_cost.layers]
    wb = _most_common([lc.weight_bits for lc in final_cost.layers])
    ab = _most_common([lc.act_bits for lc in final_cost.layers])
    fc = final_cost.to_dict()
    return {
        "task": task.name,
        "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "prunq_version": __version__,
        # A stage's other metrics (the task's extras, e.g. stereo's "val" and "middlebury") sit beside its
        # headline figures; the METHOD.md §5 keys come last so that an extra can never shadow one.
        "dense": {
            **_extras(dense), "metric": dense.metric, "params": dense_cost.params, "macs": dense_cost.macs,
            "bops": dense_cost.dense_fp32_bops, "memory_bits": dense_cost.dense_fp32_memory_bits,
        },
        "pruned": {
            **_extras(pruned), "metric": pruned.metric, "sparsity": pruned.extra.get("sparsity", 0.0),
            **({"bops": pruned_cost.bops, "memory_bits": pruned_cost.memory_bits} if pruned_cost else {}),
        },
        "compressed": {
            **_extras(compressed), "metric": compressed.metric, "sparsity": final_cost.sparsity,
            "weight_bits": wb, "act_bits": ab, "bops": final_cost.bops, "memory_bits": final_cost.memory_bits,
        },
        "memory_ratio": final_cost.memory_ratio,
        "bops_ratio": final_cost.bops_ratio,
        "memory_ratio_int8": final_cost.memory_ratio_int8,
        "bops_ratio_int8": final_cost.bops_ratio_int8,
        "memory_bits_by_encoding": fc.get("memory_bits_by_encoding", {}),
        "entropy_bound_bits": sum(lc.entropy_bits for lc in final_cost.layers),
        "layers": layers,
        "history": history,
        "timing": timing,
    }  # fmt: skip


def compress(
    model: nn.Module,
    task: Task,
    recipe: Recipe | dict | str | Path | None = None,
    *,
    quiet: bool = False,
    model_spec: dict[str, Any] | None = None,
    inplace: bool = False,
) -> CompressResult:
    """Compress a trained ``model`` on ``task`` with ``recipe``: prune, then quantize.

    Returns the compressed model (a copy unless ``inplace``), the metrics and a manifest.

    >>> from prunq.tasks import get_task                                  # doctest: +SKIP
    >>> task = get_task("digits"); model = train_my_model(task)           # doctest: +SKIP
    >>> res = compress(model, task, {"prune": {"sparsity": 0.98}})        # doctest: +SKIP
    >>> res.metrics["compressed"]["metric"], res.metrics["bops_ratio"]    # doctest: +SKIP
    """
    recipe = as_recipe(recipe)
    if not inplace:
        model = copy.deepcopy(model)
    t_start = time.perf_counter()
    history: list[dict] = []
    dense_metric, dense_extra = evaluate_metric(task, model)
    history.append({"stage": "dense", "step": 0, "metric": dense_metric})
    dense = StageResult(model, dense_metric, dense_extra)
    previews = stage_previews(task, model, "dense")
    dense_cost = C.measure(model, task.example_inputs())
    pruned = run_prune(model, task, recipe, history=history, quiet=quiet)
    pruned_cost = stage_cost(model, task, dense_cost)
    if recipe.quant.enabled:
        compressed, pairs = run_quant(model, task, recipe, history=history, quiet=quiet)
    else:
        compressed, pairs = StageResult(model, pruned.metric, dict(pruned.extra)), []
        compressed.extra.pop("sparsity", None)
    final_cost = stage_cost(model, task, dense_cost)
    timing = {"prune_s": pruned.seconds, "quant_s": compressed.seconds, "total_s": time.perf_counter() - t_start}
    metrics = build_metrics(task, dense, dense_cost, pruned, compressed, final_cost, history, timing, pruned_cost)
    manifest = make_manifest(model, recipe, pairs, model_spec or zoo_spec(recipe, task))
    previews.update(stage_previews(task, model, "compressed"))
    return CompressResult(model, metrics, manifest, history, previews)


def stage_previews(task: Task, model: nn.Module, stage: str) -> dict[str, Any]:
    """The task's previews of ``model``, keyed ``"<stage>.<name>"`` (what ``previews.safetensors`` holds)."""
    return {f"{stage}.{k}": v for k, v in task.previews(model).items()}


def zoo_spec(recipe: Recipe, task: Task) -> dict[str, Any]:
    """The zoo entry recorded in ``model.json``, with the task's defaults resolved (e.g. stereo's
    ``max_disp``), so that :func:`prunq.load` rebuilds exactly the trained architecture."""
    kwargs = task.model_kwargs(recipe.model.name, **recipe.model.kwargs)
    return {"task": recipe.task.name, "name": recipe.model.name, "kwargs": kwargs}


def make_manifest(
    model: nn.Module, recipe: Recipe, pairs: list[tuple[str, str]], model_spec: dict[str, Any] | None
) -> dict[str, Any]:
    """What :func:`prunq.load` needs to rebuild the compressed structure before loading weights."""
    spec = model_spec or {"task": recipe.task.name, "name": recipe.model.name, "kwargs": dict(recipe.model.kwargs)}
    return {
        "format": 1,
        "prunq_version": __version__,
        "model": spec,
        "masked": [name for name, _, _ in M.masked_modules(model)],
        "folded": [list(p) for p in pairs],
        "quant": dataclasses.asdict(quant_config(recipe.quant)) if recipe.quant.enabled else None,
    }


def train_dense(model: nn.Module, task: Task, recipe: Recipe, *, quiet: bool = False) -> list[dict]:
    """Train ``model`` from scratch with ``recipe.dense`` (for bundled tasks with no checkpoint)."""
    return fit(
        model, task, recipe.dense, batch_size=recipe.task.batch_size, seed=recipe.seed, stage="dense", quiet=quiet,
    )  # fmt: skip


__all__ = [
    "compress", "run_prune", "run_quant", "train_dense", "evaluate_metric", "stage_cost", "build_metrics",
    "stage_previews", "zoo_spec", "CompressResult", "StageResult", "as_recipe", "quant_calibration_batches",
]  # fmt: skip
