"""Run directories (METHOD.md §5): what ``prunq compress`` and ``prunq sweep`` write, and how."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.pipeline.io import DENSE_FILE, PREVIEWS_FILE, TIMING_FILE, load_state, save_model, save_tensors
from prunq.pipeline.checkpoint import DENSE_POSITION, WorkDir, snapshot
from prunq.pipeline.export import PACKED_FILE
from prunq.pipeline.training import FitState, fit, rng_devices
from prunq.pipeline.run import CompressResult, check_task, compress, load_model_state, train_dense, zoo_spec
from prunq.pipeline.recipes import Recipe, dump_recipe
from prunq.tasks import get_task
from prunq.tasks.base import Task


def make_task(recipe: Recipe) -> Task:
    """The task a recipe names, with its data directory and options."""
    kwargs = dict(recipe.task.options)
    if recipe.task.data_dir is not None:
        kwargs["data_dir"] = recipe.task.data_dir
    try:
        return get_task(recipe.task.name, **kwargs)
    except TypeError as e:
        raise PrunqError(f"task.options: {e}") from None


def dense_model(
    recipe: Recipe, task: Task, *, quiet: bool = False, work: WorkDir | None = None
) -> tuple[nn.Module, list[dict], float]:
    """The dense starting point: the recipe's checkpoint, or a model trained with ``recipe.dense``.

    With ``work``: a dense model trained before (the run was killed later) is read back; dense training
    checkpoints every ``work.every`` steps and continues from the last one."""
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=rng_devices()):  # seeded initialisation without reseeding the caller
        torch.manual_seed(recipe.seed)
        try:
            model = task.build_model(recipe.model.name, **recipe.model.kwargs)
        except TypeError as e:
            raise PrunqError(f"model.kwargs: {e}") from None
    history: list[dict] = []
    done = work.dense() if work is not None else None
    if done is not None:
        state, history, seconds = done
        load_model_state(model, state, str(work.path / "dense.safetensors"))
        return model, history, seconds
    if recipe.model.checkpoint:
        state = load_state(recipe.model.checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise PrunqError(
                f"{recipe.model.checkpoint}: does not match model {recipe.model.name!r} ({str(e).splitlines()[0]})"
            ) from None
    elif work is None:
        history = train_dense(model, task, recipe, quiet=quiet)
    else:
        history, spent = _train_dense_with_checkpoints(model, task, recipe, work, quiet, t0)
        t0 -= spent  # the seconds a killed run spent before count too
    seconds = time.perf_counter() - t0
    if work is not None:
        work.save_dense(model.state_dict(), history, seconds)
    return model, history, seconds


def _train_dense_with_checkpoints(model, task, recipe, work: WorkDir, quiet: bool, t0: float) -> tuple[list[dict], float]:
    saved = work.step(DENSE_POSITION)
    history: list[dict] = []
    resume, spent = None, 0.0
    if saved is not None:
        load_model_state(model, saved.model, str(work.path))
        history, resume, spent = saved.history, saved.fit, saved.seconds

    def checkpoint(state: FitState):
        snap = (snapshot(model.state_dict()), state, list(history), spent + time.perf_counter() - t0)
        return lambda: work.save_step(DENSE_POSITION, snap[0], {}, *snap[1:])

    history = fit(model, task, recipe.dense, batch_size=recipe.task.batch_size, seed=recipe.seed, stage="dense",
                  quiet=quiet, history=history, checkpoint=checkpoint, checkpoint_every=work.every, resume=resume)  # fmt: skip
    return history, spent


def write_run(directory: Path, recipe: Recipe, result: CompressResult, *, render: bool = True) -> None:
    """Write recipe.yaml, metrics.json, timing.json, model.safetensors + model.json, previews.safetensors
    (when the task has pictures to show), dense.safetensors (when the run trained its dense model) and the
    report. Everything but timing.json and the report is byte-identical for the same recipe and seed."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "recipe.yaml").write_text(dump_recipe(recipe))
    (directory / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
    if result.timing:
        (directory / TIMING_FILE).write_text(json.dumps(result.timing, indent=2))
    save_model(directory, result.model, result.manifest)
    if result.previews:
        save_tensors(directory / PREVIEWS_FILE, result.previews)
    if result.dense_state is not None:  # reusable as `model.checkpoint` for another compression run
        save_tensors(directory / DENSE_FILE, result.dense_state)
    if result.packed is not None:  # the deployable file at the cost model's size (prunq.load reads it)
        (directory / PACKED_FILE).write_bytes(result.packed)
    if render:
        from prunq.report.report import render_report

        render_report(directory)


def compress_recipe(recipe: Recipe, *, quiet: bool = False, work: WorkDir | None = None) -> CompressResult:
    """Everything ``prunq compress`` does before writing: task, dense model, the methods. ``work`` keeps
    checkpoints and continues from the last one (:mod:`prunq.pipeline.checkpoint`)."""
    task = make_task(recipe)
    check_task(task, recipe)  # before the dense training, not after it
    model, dense_hist, dense_s = dense_model(recipe, task, quiet=quiet, work=work)
    trained = None if recipe.model.checkpoint else snapshot(model.state_dict())
    result = compress(model, task, recipe, quiet=quiet, model_spec=zoo_spec(recipe, task), inplace=True, work=work)
    if dense_hist:  # the dense metric is measured after training: plot it there
        result.metrics["history"][0]["step"] = recipe.dense.steps
    result.metrics["history"] = dense_hist + result.metrics["history"]
    result.timing["dense_s"] = dense_s
    result.timing["total_s"] += dense_s
    result.dense_state = trained
    return result
