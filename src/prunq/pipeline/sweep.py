"""The joint view: a grid over sparsity x weight bits x activation bits, sharing work between points.

The dense model is trained (or loaded) once; stage 1 runs once per sparsity; stage 2 once per
(sparsity, weight bits, activation bits) on a copy of that pruned model.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from prunq.cost import measure as C
from prunq.pipeline.run import (
    CompressResult, StageResult, build_metrics, evaluate_metric, make_manifest, run_prune, run_quant, stage_cost,
    stage_previews, zoo_spec,
)  # fmt: skip
from prunq.pipeline.recipes import Recipe
from prunq.report.report import flatten
from prunq.pipeline.runs import dense_model, make_task, write_run


def point_name(sparsity: float, wb: int, ab: int) -> str:
    """Sub-directory name of one grid point, e.g. ``s0.98_w4a8``."""
    return f"s{sparsity:g}_w{wb}a{ab}"


def run_sweep(
    recipe: Recipe, sparsities: list[float], bits: list[tuple[int, int]], out: Path,
    *, quiet: bool = False, dense: tuple[nn.Module, list[dict]] | None = None, render: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Run the grid into ``out/runs/<point>/`` and return the table rows and the dense reference.

    ``bits`` lists the (weight bits, activation bits) pairs to try at every sparsity. ``dense`` is a
    trained model and its training history to start from (default: the recipe's checkpoint or dense
    training); it is not modified. ``render=False`` writes the runs without their reports.
    """
    task = make_task(recipe)
    if dense is None:
        d_model, dense_hist, _ = dense_model(recipe, task, quiet=quiet)
    else:
        d_model, dense_hist = dense
    d_metric, d_extra = evaluate_metric(task, d_model)
    d_stage = StageResult(d_model, d_metric, d_extra)
    d_cost = C.measure(d_model, task.example_inputs())
    d_previews = stage_previews(task, d_model, "dense")
    rows: list[dict[str, Any]] = []
    points = tqdm(total=len(sparsities) * len(bits), desc="sweep", disable=True if quiet else None)
    for s in sparsities:
        r_s = recipe.with_(**{"prune.sparsity": s})
        hist: list[dict] = [{"stage": "dense", "step": 0, "metric": d_metric}]
        pruned_model = copy.deepcopy(d_model)
        pruned = run_prune(pruned_model, task, r_s, history=hist, quiet=quiet)
        p_cost = stage_cost(pruned_model, task, d_cost)
        for wb, ab in bits:
            t0 = time.perf_counter()
            r = r_s.with_(**{"quant.weight_bits": wb, "quant.act_bits": ab})
            h = list(hist)
            model = copy.deepcopy(pruned_model)
            comp, pairs = run_quant(model, task, r, history=h, quiet=quiet)
            cost = stage_cost(model, task, d_cost)
            timing = {"prune_s": pruned.seconds, "quant_s": comp.seconds, "total_s": time.perf_counter() - t0}
            metrics = build_metrics(task, d_stage, d_cost, pruned, comp, cost, h, timing, p_cost)
            name = point_name(s, wb, ab)
            previews = {**d_previews, **stage_previews(task, model, "compressed")}
            result = CompressResult(model, metrics, make_manifest(model, r, pairs, zoo_spec(r, task)), h, previews)
            write_run(out / "runs" / name, r, result, render=render)
            rows.append({
                "sparsity": s, "weight_bits": wb, "act_bits": ab, "metric": comp.metric,
                "pruned_metric": pruned.metric, "achieved_sparsity": cost.sparsity,
                "bops": cost.bops, "memory_bits": cost.memory_bits,
                "bops_ratio": cost.bops_ratio, "memory_ratio": cost.memory_ratio, "run": f"runs/{name}",
                "prune_s": pruned.seconds, "quant_s": comp.seconds, **flatten(comp.extra),
            })  # fmt: skip
            points.update(1)
            points.set_postfix({"point": name, "metric": f"{comp.metric:.4g}"})
    points.close()
    dense_ref = {"metric": d_metric, "bops": d_cost.dense_fp32_bops, "memory_bits": d_cost.dense_fp32_memory_bits,
                 "params": d_cost.params, "macs": d_cost.macs, "extra": d_extra}
    return rows, {"dense": dense_ref, "metric_name": task.metric_name, "higher_is_better": task.higher_is_better,
                  "task": task.name, "dense_history": dense_hist}  # fmt: skip
