"""The joint view: a grid over sparsity x weight bits x activation bits, sharing work between points.

The dense model is trained (or loaded) once; the recipe's methods up to its last pruning method run once
per sparsity, the methods after it once per (sparsity, weight bits, activation bits) on a copy of that
pruned model — both through the one runner, :func:`prunq.pipeline.run.run_methods`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunq.core.errors import PrunqError
from prunq.core.method import build_method
from prunq.pipeline.checkpoint import WorkDir
from prunq.pipeline.recipes import Recipe
from prunq.pipeline.run import (
    CompressResult, StageResult, _timing, attach_files, build_metrics, check_task, evaluate_metric, make_manifest,
    prepare_structure, state_bytes,
    run_methods, stage_cost,
    stage_previews, zoo_spec,
)  # fmt: skip
from prunq.pipeline.runs import dense_model, make_task, write_run
from prunq.pipeline.training import rng_devices
from prunq.report.fsutil import atomic_dir, atomic_write_text
from prunq.report.report import flatten


def point_name(sparsity: float, wb: int, ab: int) -> str:
    """Sub-directory name of one grid point, e.g. ``s0.98_w4a8``."""
    return f"s{sparsity:g}_w{wb}a{ab}"


def run_sweep(
    recipe: Recipe, sparsities: list[float], bits: list[tuple[int, int]], out: Path | None,
    *, quiet: bool = False, dense: tuple[nn.Module, list[dict]] | None = None, render: bool = True,
    work: WorkDir | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Run the grid into ``out/runs/<point>/`` and return the table rows and the dense reference.

    ``bits`` lists the (weight bits, activation bits) pairs to try at every sparsity. ``dense`` is a
    trained model and its training history to start from (default: the recipe's checkpoint or dense
    training); it is not modified. ``render=False`` writes the runs without their reports.

    With ``work`` (``prunq sweep``; ``out`` is then unused): the dense training is checkpointed, each
    finished point is kept in ``work`` (see :func:`collect_points`), and points a killed sweep finished
    are skipped — a sparsity whose points are all done is not pruned again.
    """
    if recipe.prune is None or recipe.quant is None:
        raise PrunqError("sweep: the recipe needs a prune and a quantize method (sparsity x bit-width grid)")
    task = make_task(recipe)
    check_task(task, recipe)
    if dense is None:
        d_model, dense_hist, _ = dense_model(recipe, task, quiet=quiet, work=work)
    else:
        d_model, dense_hist = dense
    d_model = copy.deepcopy(d_model)
    structure = prepare_structure(d_model)
    d_metric, d_extra = evaluate_metric(task, d_model)
    d_stage = StageResult("dense", d_metric, d_extra, transforms=structure)
    d_cost = stage_cost(d_model, task, None)
    d_bytes = state_bytes(d_model)
    d_previews = stage_previews(task, d_model, "dense")
    rows: list[dict[str, Any]] = []
    split = 1 + max(i for i, m in enumerate(recipe.methods) if build_method(m).prunes)
    sparsities = list(dict.fromkeys(sparsities))  # a repeated value is one point, not two
    bits = list(dict.fromkeys(bits))
    points = tqdm(total=len(sparsities) * len(bits), desc="sweep", disable=True if quiet else None)
    for s in sparsities:
        r_s = recipe.with_(**{"prune.sparsity": s})
        done = {wb_ab: _done_row(work, point_name(s, *wb_ab)) for wb_ab in bits}
        if all(row is not None for row in done.values()):
            rows += [done[b] for b in bits]
            points.update(len(bits))
            continue
        kw = dict(seed=r_s.seed, batch_size=r_s.task.batch_size, quiet=quiet, eval_every=r_s.eval_every)
        hist: list[dict] = [{"stage": "dense", "step": 0, "metric": d_metric}]
        pruned_model = copy.deepcopy(d_model)
        with _seeded(recipe.seed, point_name(s, 0, 0)):  # the same RNG whichever points ran before
            head = run_methods(pruned_model, task, r_s.methods[:split], history=hist, **kw)
        p_cost = stage_cost(pruned_model, task, d_cost)
        for wb, ab in bits:
            if done[(wb, ab)] is not None:
                rows.append(done[(wb, ab)])
                points.update(1)
                continue
            t0 = time.perf_counter()
            r = r_s.with_(**{"quant.weight_bits": wb, "quant.act_bits": ab})
            h = list(hist)
            model = copy.deepcopy(pruned_model)
            with _seeded(recipe.seed, point_name(s, wb, ab)):
                tail = run_methods(model, task, r.methods[split:], history=h, first_position=split, **kw)
            stages = head + tail
            cost = stage_cost(model, task, d_cost)
            timing = _timing(stages, sum(x.seconds for x in head) + time.perf_counter() - t0)
            metrics = build_metrics(task, d_stage, d_cost, stages, cost, h, p_cost)
            name = point_name(s, wb, ab)
            previews = {**d_previews, **stage_previews(task, model, "compressed")}
            manifest = make_manifest([d_stage, *stages], zoo_spec(r, task), model)
            result = attach_files(CompressResult(model, metrics, manifest, h, previews, timing=timing), d_bytes)
            last = stages[-1]
            row = {
                "sparsity": s, "weight_bits": wb, "act_bits": ab, "metric": last.metric,
                "pruned_metric": head[-1].metric, "achieved_sparsity": cost.sparsity,
                "bops": cost.bops, "memory_bits": cost.memory_bits,
                "bops_ratio": cost.bops_ratio, "memory_ratio": cost.memory_ratio, "run": f"runs/{name}",
                "prune_s": timing.get("prune_s", 0.0), "quant_s": timing.get("quant_s", 0.0), **flatten(last.extra),
            }  # fmt: skip
            if work is None:
                write_run(out / "runs" / name, r, result, render=render)
            else:
                _keep_point(work, name, r, result, row, render)
            rows.append(row)
            points.update(1)
            points.set_postfix({"point": name, "metric": f"{last.metric:.4g}"})
    points.close()
    dense_ref = {"metric": d_metric, "bops": d_cost.dense_fp32_bops, "memory_bits": d_cost.dense_fp32_memory_bits,
                 "params": d_cost.params, "macs": d_cost.macs, "extra": d_extra}
    return rows, {"dense": dense_ref, "metric_name": task.metric_name, "higher_is_better": task.higher_is_better,
                  "task": task.name, "dense_history": dense_hist}  # fmt: skip


def _done_row(work: WorkDir | None, name: str) -> dict[str, Any] | None:
    """The table row of a point a killed sweep finished (its run is complete in ``work``), else None."""
    if work is None:
        return None
    row, run = work.path / "rows" / f"{name}.json", work.path / "points" / name
    if not (row.is_file() and run.is_dir()) or row.is_symlink() or run.is_symlink():
        return None
    try:
        data = json.loads(row.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _keep_point(work: WorkDir, name: str, recipe: Recipe, result: CompressResult, row: dict, render: bool) -> None:
    """Write a finished point into ``work/points/<name>`` (atomically), then its row (the mark of done).
    A point directory without its row (a kill between the two writes) is prunq's own leftover: replaced."""
    import shutil

    point = work.path / "points" / name
    if point.is_dir() and not point.is_symlink() and not (work.path / "rows" / f"{name}.json").exists():
        shutil.rmtree(point)
    with atomic_dir(point, overwrite=False) as tmp:
        write_run(tmp, recipe, result, render=render)
    atomic_write_text(work.path / "rows" / f"{name}.json", json.dumps(row))


def collect_points(work: WorkDir, rows: list[dict[str, Any]], out: Path) -> None:
    """Move the finished points from ``work`` into ``out/runs/`` (same file system: renames)."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for row in rows:
        name = Path(row["run"]).name
        (work.path / "points" / name).rename(out / "runs" / name)


@contextlib.contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """The global RNG seeded from the recipe's seed and a point's name for a block, restored after: a point
    computes the same numbers whether or not the points before it ran (a resumed sweep skips them)."""
    with torch.random.fork_rng(devices=rng_devices()):
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        yield
