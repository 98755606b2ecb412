"""The one runner: dense evaluation -> each of the recipe's methods in order (attach, fine-tune with its
hooks, finalize) -> final evaluation, measured by the cost model. ``compress()``, ``prunq sweep`` and the
benchmarks all run methods through :func:`run_methods`."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

import prunq.methods  # noqa: F401  (registers the built-in methods)
from prunq import __version__
from prunq.core.attention import decompose_attention_
from prunq.core.config import MethodConfig
from prunq.core.errors import PrunqError
from prunq.core.manifest import FORMAT, replay
from prunq.core.method import RunContext, Transform, build_method
from prunq.cost import measure as C
from prunq.methods.quantize import calibration_batches
from prunq.pipeline.checkpoint import WorkDir, snapshot
from prunq.pipeline.recipes import Recipe, load_recipe, parse_recipe
from prunq.pipeline.training import fit
from prunq.tasks.base import Task


@dataclass
class StageResult:
    """What a stage (the dense model, or one method) leaves behind: its metric and other metrics, the
    sparsity when the stage prunes, its time, and the transforms it recorded."""

    name: str
    metric: float
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    sparsity: float | None = None
    kind: str = "dense"
    transforms: list[Transform] = field(default_factory=list)


@dataclass
class CompressResult:
    """The output of :func:`compress`: the compressed model, the metrics (METHOD.md §5) and the manifest
    (the ordered transform log that :func:`prunq.load` replays)."""

    model: nn.Module
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    history: list[dict]
    previews: dict[str, Any] = field(default_factory=dict)
    dense_state: dict[str, Any] | None = None  # the dense weights, when the run trained them
    #: Wall time per stage (``timing.json``): kept out of ``metrics.json`` so that the same recipe and seed
    #: give a byte-identical ``metrics.json``.
    timing: dict[str, float] = field(default_factory=dict)
    #: The packed file's bytes (``model.packed``), None when the packed format cannot hold the model.
    packed: bytes | None = None


def attach_files(result: CompressResult, dense_model_bytes: int) -> CompressResult:
    """Pack the compressed model and record, in ``metrics["files"]``, the bytes of real files beside the
    cost model's figure: the dense model as an fp32 safetensors file, the packed file (or why it could
    not be written)."""
    from prunq.pipeline.export import export_bytes

    files: dict[str, Any] = {"dense_fp32_bytes": dense_model_bytes,
                             "cost_model_bytes": result.metrics["compressed"]["memory_bits"] / 8}  # fmt: skip
    try:
        result.packed = export_bytes((result.model, result.manifest))
        files["packed_bytes"] = len(result.packed)
    except PrunqError as e:
        files["packed_error"] = str(e)
    result.metrics["files"] = files
    return result


def state_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s state dict written as a safetensors file (what the user's fp32 file weighs)."""
    from prunq.pipeline.io import tensor_bytes

    return len(tensor_bytes(model.state_dict()))


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
    """``(headline metric, the task's other metrics)`` on the test split.

    Under ``parametrize.cached()``: the masked, fake-quantized weights are computed once for the whole
    evaluation instead of at every forward (same values; evaluation never changes weights).
    """
    with parametrize.cached():
        out = dict(task.evaluate(model))
    metric = float(out.pop("metric"))
    return metric, out


def check_task(task: Task, recipe: Recipe) -> None:
    """What the recipe needs from the task, checked before any training (not at the first eval point)."""
    if recipe.eval_every and type(task).validate is Task.validate:
        raise PrunqError(
            f"eval_every: task {task.name!r} has no validation split (Task.validate); set eval_every: 0"
        )


def _validator(task: Task):
    def validate(model: nn.Module) -> float:
        with parametrize.cached():
            return float(task.validate(model)["metric"])

    return validate


def run_methods(
    model: nn.Module,
    task: Task,
    methods: list[MethodConfig],
    *,
    seed: int,
    batch_size: int,
    history: list[dict],
    quiet: bool = False,
    eval_every: int = 0,
    first_position: int = 0,
    work: WorkDir | None = None,
    after_each: Callable[[int, StageResult], None] | None = None,
) -> list[StageResult]:
    """Run ``methods`` in order on ``model`` (in place): attach, fine-tune with the method's hooks when it
    has steps, finalize (its transforms), evaluate. ``first_position`` is the index of ``methods[0]`` in
    the recipe (a sweep runs a recipe's methods in two calls; seeds follow the recipe position).

    ``work``: fine-tuning checkpoints every ``work.every`` steps (for methods with a ``state_dict``), and a
    method that has one in ``work`` continues from it. ``after_each(position, stage)`` runs after each
    method (the runner writes its stage-boundary checkpoint there)."""
    stages = []
    for i, cfg in enumerate(methods, start=first_position):
        t0 = time.perf_counter()
        method = build_method(cfg)
        ctx = RunContext(
            task=task, seed=seed, batch_size=batch_size, position=i, history=history, quiet=quiet,
            eval_every=eval_every, validate=_validator(task), example_inputs=task.example_inputs(),
        )  # fmt: skip
        method.attach(model, ctx)
        resume, checkpoint, spent = None, None, 0.0
        if work is not None and method.state_dict() is not None:
            saved = work.step(i)
            if saved is not None:  # same starting weights and RNG: attach made what the saved state continues
                load_model_state(model, saved.model, str(work.path))
                method.load_state_dict(saved.method)
                history[:] = saved.history
                resume, spent = saved.fit, saved.seconds

            def checkpoint(state, i=i, method=method, t0=t0, spent=spent):
                snap = (snapshot(model.state_dict()),
                        copy.deepcopy(method.state_dict()), state, list(history), spent + time.perf_counter() - t0)
                return lambda: work.save_step(i, *snap)

        fit(model, task, cfg.finetune, batch_size=batch_size, seed=seed + 1 + i, stage=method.stage, hooks=method,
            history=history, quiet=quiet, checkpoint=checkpoint, checkpoint_every=work.every if work else 0,
            resume=resume)  # fmt: skip
        transforms = method.finalize(model, ctx)
        metric, extra = evaluate_metric(task, model)
        sparsity = method.sparsity() if method.prunes and hasattr(method, "sparsity") else None
        entry: dict[str, Any] = {"stage": method.stage, "step": cfg.finetune.steps, "metric": metric}
        if sparsity is not None:
            entry["sparsity"] = sparsity
        history.append(entry)
        stage = StageResult(method.stage, metric, extra, spent + time.perf_counter() - t0, sparsity, cfg.kind, transforms)
        stages.append(stage)
        if after_each is not None:
            after_each(i, stage)
    return stages


def load_model_state(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """Load a checkpoint's model state (strict; a mismatch is a one-line error naming ``source``)."""
    from prunq.pipeline.io import _load_strict

    _load_strict(model, state, Path(source))


def stage_to_dict(stage: StageResult) -> dict[str, Any]:
    """A stage as JSON (for a checkpoint)."""
    out = asdict(stage)
    out["transforms"] = [t.to_dict() for t in stage.transforms]
    return out


def stage_from_dict(data: dict[str, Any]) -> StageResult:
    """The inverse of :func:`stage_to_dict`."""
    transforms = []
    for t in data["transforms"]:
        args = dict(t)
        transforms.append(Transform(args.pop("op"), args))
    return StageResult(**{**data, "transforms": transforms})


def prepare_structure(model: nn.Module) -> list[Transform]:
    """Make every layer visible to the methods, in place, with outputs unchanged: each
    ``nn.MultiheadAttention`` becomes :class:`~prunq.core.attention.DecomposedAttention` (its projections
    are plain Linear layers that are pruned, quantized and counted). Runs before the dense model is
    measured; the transforms open the manifest."""
    names = decompose_attention_(model)
    return [Transform("decompose_attention", {"layers": names})] if names else []


def stage_cost(model: nn.Module, task: Task, reference: C.ModelCost | None) -> C.ModelCost:
    """The cost model on ``model`` as it stands (bits from its own quantizer records)."""
    return C.measure(model, task.example_inputs(), reference=reference, batch_size=task.example_batch_size)


def pruned_figures(cost: C.ModelCost | dict[str, Any]) -> dict[str, Any]:
    """What ``metrics["pruned"]`` takes from the cost model of the pruned model (kept in checkpoints)."""
    if isinstance(cost, dict):
        return {k: cost[k] for k in ("bops", "memory_bits", "weight_bops", "act_bops") if k in cost}
    return {"bops": cost.bops, "memory_bits": cost.memory_bits, "weight_bops": cost.weight_bops, "act_bops": cost.act_bops}


def _most_common(values: list[int]) -> int:
    return max(set(values), key=values.count) if values else 32


def build_metrics(
    task: Task,
    dense: StageResult,
    dense_cost: C.ModelCost,
    stages: list[StageResult],
    final_cost: C.ModelCost,
    history: list[dict],
    pruned_cost: C.ModelCost | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``metrics.json`` document (METHOD.md §5), plus per-layer encodings and the stages; no wall times
    (they go to ``timing.json``), so that a run's metrics are reproducible byte for byte.

    ``pruned`` is the model after the last method that prunes (the dense model when none does);
    ``compressed`` the model after the last method.
    """
    layers = [lc.to_dict() for lc in final_cost.layers]
    wb = _most_common([lc.weight_bits for lc in final_cost.layers])
    ab = _most_common([lc.act_bits for lc in final_cost.layers])
    fc = final_cost.to_dict()
    pruned = next((s for s in reversed(stages) if s.sparsity is not None), None)
    last = stages[-1] if stages else dense
    pruned_section: dict[str, Any] = (
        {**pruned.extra, "metric": pruned.metric, "sparsity": pruned.sparsity}
        if pruned is not None
        else {**dense.extra, "metric": dense.metric, "sparsity": 0.0}
    )
    if pruned_cost is not None:
        pruned_section.update(pruned_figures(pruned_cost))
    return {
        "task": task.name,
        "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "prunq_version": __version__,
        # A stage's other metrics (the task's extras, e.g. stereo's "val" and "middlebury") sit beside its
        # headline figures; the METHOD.md §5 keys come last so that an extra can never shadow one.
        "dense": {
            **dense.extra, "metric": dense.metric, "params": dense_cost.params, "macs": dense_cost.macs,
            "bops": dense_cost.dense_fp32_bops, "memory_bits": dense_cost.dense_fp32_memory_bits,
            # BOPs = weight x activation products of the compressed layers + activation x activation
            # products (correlation volumes, attention, soft-argmin), both at fp32 here
            "weight_bops": float(dense_cost.macs * 32 * 32),
            "act_bops": dense_cost.dense_fp32_bops - float(dense_cost.macs * 32 * 32),
        },
        "pruned": pruned_section,
        "compressed": {
            **last.extra, "metric": last.metric, "sparsity": final_cost.sparsity,
            "weight_bits": wb, "act_bits": ab, "bops": final_cost.bops, "memory_bits": final_cost.memory_bits,
            "weight_bops": final_cost.weight_bops, "act_bops": final_cost.act_bops,
        },
        "stages": [
            {"name": s.name, "kind": s.kind, "metric": s.metric,
             **({"sparsity": s.sparsity} if s.sparsity is not None else {})}
            for s in stages
        ],
        "memory_ratio": final_cost.memory_ratio,
        "bops_ratio": final_cost.bops_ratio,
        "memory_ratio_int8": final_cost.memory_ratio_int8,
        "bops_ratio_int8": final_cost.bops_ratio_int8,
        "memory_bits_by_encoding": fc.get("memory_bits_by_encoding", {}),
        "entropy_bound_bits": sum(lc.entropy_bits for lc in final_cost.layers),
        "layers": layers,
        # activation x activation products, per site (name, op, bits, MACs, BOPs) of the compressed model
        "act_sites": fc.get("act_sites", []),
        "history": history,
    }  # fmt: skip


def _timing(stages: list[StageResult], total: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in stages:  # two methods with one stage name add up
        out[f"{s.name}_s"] = out.get(f"{s.name}_s", 0.0) + s.seconds
    out.setdefault("prune_s", 0.0)
    out.setdefault("quant_s", 0.0)
    out["total_s"] = total
    return out


def compress(
    model: nn.Module,
    task: Task,
    recipe: Recipe | dict | str | Path | None = None,
    *,
    quiet: bool = False,
    model_spec: dict[str, Any] | None = None,
    inplace: bool = False,
    work: WorkDir | None = None,
) -> CompressResult:
    """Compress a trained ``model`` on ``task`` with the recipe's methods (default: prune, then quantize).

    Returns the compressed model (a copy unless ``inplace``), the metrics and a manifest. ``model_spec``
    records where the architecture comes from (a zoo entry ``{"task", "name", "kwargs"}``); without it the
    run is recorded as a user model, and :func:`prunq.load` then needs ``model=``. ``work`` keeps
    checkpoints (:mod:`prunq.pipeline.checkpoint`) and continues from the last one it holds.

    >>> from prunq.tasks import get_task                                  # doctest: +SKIP
    >>> task = get_task("digits"); model = train_my_model(task)           # doctest: +SKIP
    >>> res = compress(model, task, {"prune": {"sparsity": 0.98}})        # doctest: +SKIP
    >>> res.metrics["compressed"]["metric"], res.metrics["bops_ratio"]    # doctest: +SKIP
    """
    recipe = as_recipe(recipe)
    check_task(task, recipe)
    if not inplace:
        model = copy.deepcopy(model)
    t_start = time.perf_counter()
    history: list[dict] = []
    structure = prepare_structure(model)
    dense_metric, dense_extra = evaluate_metric(task, model)
    dense = StageResult("dense", dense_metric, dense_extra, transforms=structure)
    previews = stage_previews(task, model, "dense")
    dense_cost = stage_cost(model, task, None)
    dense_bytes = state_bytes(model)
    # Measure the model after the last pruning method, before any later method changes it.
    last_prune = max((i for i, m in enumerate(recipe.methods) if build_method(m).prunes), default=-1)
    stages: list[StageResult] = []
    pruned: dict[str, Any] | None = None
    start = 0
    boundary = work.boundary() if work is not None else None
    if boundary is not None:  # continue a killed run: the stages it finished, its weights and RNG
        record = boundary.record
        stages = [stage_from_dict(d) for d in record["stages"]]
        history, pruned, start = record["history"], record["pruned"], boundary.position
        source = str(work.path / "boundary.safetensors")
        replay(model, [t.to_dict() for s in stages for t in s.transforms], source)
        load_model_state(model, boundary.model, source)
        torch.set_rng_state(boundary.rng)
    else:
        history.append({"stage": "dense", "step": 0, "metric": dense_metric})

    def checkpoint(position: int) -> None:
        if work is not None:
            record = {"stages": [stage_to_dict(s) for s in stages], "history": history, "pruned": pruned}
            work.save_boundary(position, model.state_dict(), record)

    if boundary is None:
        checkpoint(0)
    kw = dict(seed=recipe.seed, batch_size=recipe.task.batch_size, history=history, quiet=quiet,
              eval_every=recipe.eval_every, work=work)  # fmt: skip
    for i in range(start, len(recipe.methods)):
        stages += run_methods(model, task, recipe.methods[i : i + 1], first_position=i, **kw)
        if i == last_prune:
            pruned = pruned_figures(stage_cost(model, task, dense_cost))
        checkpoint(i + 1)
    pruned_cost = pruned if last_prune >= 0 else None
    final_cost = stage_cost(model, task, dense_cost)
    metrics = build_metrics(task, dense, dense_cost, stages, final_cost, history, pruned_cost)
    manifest = make_manifest([dense, *stages], model_spec, model)
    previews.update(stage_previews(task, model, "compressed"))
    timing = _timing(stages, time.perf_counter() - t_start)
    return attach_files(CompressResult(model, metrics, manifest, history, previews, timing=timing), dense_bytes)


def stage_previews(task: Task, model: nn.Module, stage: str) -> dict[str, Any]:
    """The task's previews of ``model``, keyed ``"<stage>.<name>"`` (what ``previews.safetensors`` holds)."""
    return {f"{stage}.{k}": v for k, v in task.previews(model).items()}


def zoo_spec(recipe: Recipe, task: Task) -> dict[str, Any]:
    """The zoo entry recorded in ``model.json``, with the task's defaults resolved (e.g. stereo's
    ``max_disp``), so that :func:`prunq.load` rebuilds exactly the trained architecture."""
    kwargs = task.model_kwargs(recipe.model.name, **recipe.model.kwargs)
    return {"origin": "zoo", "task": recipe.task.name, "name": recipe.model.name, "kwargs": kwargs}


def make_manifest(stages: list[StageResult], model_spec: dict[str, Any] | None, model: nn.Module | None = None) -> dict[str, Any]:
    """The manifest (METHOD.md §5): the model's origin and the ordered transforms the stages recorded."""
    if model_spec:
        origin = {"origin": "zoo", **model_spec}
    else:
        origin = {"origin": "user", "class": type(model).__name__ if model is not None else None}
    return {
        "format": FORMAT,
        "prunq_version": __version__,
        "model": origin,
        "transforms": [t.to_dict() for s in stages for t in s.transforms],
    }


def quant_calibration_batches(task: Task, recipe: Recipe) -> list:
    """The training batches the recipe's quantize method calibrates on (its own seed)."""
    return calibration_batches(task, recipe.quant, recipe.task.batch_size, recipe.seed)


def train_dense(model: nn.Module, task: Task, recipe: Recipe, *, quiet: bool = False) -> list[dict]:
    """Train ``model`` from scratch with ``recipe.dense`` (for bundled tasks with no checkpoint)."""
    return fit(
        model, task, recipe.dense, batch_size=recipe.task.batch_size, seed=recipe.seed, stage="dense", quiet=quiet,
    )  # fmt: skip


__all__ = [
    "compress", "run_methods", "train_dense", "evaluate_metric", "stage_cost", "build_metrics",
    "stage_previews", "zoo_spec", "make_manifest", "CompressResult", "StageResult", "as_recipe",
    "quant_calibration_batches",
]  # fmt: skip
