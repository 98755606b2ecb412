"""The sparsity x bit-width grid (prunq.pipeline.sweep): the pruned model is made once per sparsity and shared
by its bit-widths; every point is a loadable run. An untrained quarter-width DigitsCNN, no fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch

import prunq
from prunq.core.errors import PrunqError
from prunq.methods.prune import PruneMethod
from prunq.pipeline.recipes import parse_recipe
from prunq.pipeline.sweep import point_name, run_sweep
from prunq.prune import masks as M
from prunq.tasks import build_model

RECIPE = {
    "task": {"name": "digits", "batch_size": 8},
    "model": {"name": "digits_cnn", "kwargs": {"width": 0.25}},
    "prune": {"sparsity": 0.9, "criterion": "magnitude", "schedule": "one_shot", "mode": "hard", "score_batches": 0,
              "finetune": {"steps": 0}},
    # max-based steps: the grid, not the calibration's search, is what a sweep varies
    "quant": {"calib_batches": 1, "weight_init": "max", "act_calibration": "max", "finetune": {"steps": 0}},
}  # fmt: skip


def test_point_name():
    assert point_name(0.98, 4, 8) == "s0.98_w4a8"
    assert point_name(0.5, 2, 4) == "s0.5_w2a4"
    assert point_name(0.999, 8, 8) == "s0.999_w8a8"  # %g: no trailing zeros, no rounding at 3 decimals


def test_one_sparsity_two_bit_widths_share_the_pruned_model(tmp_path, monkeypatch):
    attached = []
    attach = PruneMethod.attach

    def counting_attach(self, model, ctx):
        attached.append(self.config.sparsity)
        return attach(self, model, ctx)

    monkeypatch.setattr(PruneMethod, "attach", counting_attach)
    torch.manual_seed(0)
    dense = build_model("digits", "digits_cnn", width=0.25)  # untrained: the sweep's work, not a dense model's
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    rows, ref = run_sweep(parse_recipe(RECIPE), [0.5], [(8, 8), (4, 8)], tmp_path, quiet=True,
                          dense=(dense, [{"stage": "dense", "step": 0}]), render=False)  # fmt: skip

    assert attached == [0.5]  # pruned once for the two bit-widths
    assert [(r["sparsity"], r["weight_bits"], r["act_bits"], r["run"]) for r in rows] == [
        (0.5, 8, 8, "runs/s0.5_w8a8"), (0.5, 4, 8, "runs/s0.5_w4a8"),
    ]  # fmt: skip
    assert rows[0]["pruned_metric"] == rows[1]["pruned_metric"]
    assert all(r["achieved_sparsity"] >= 0.5 - 0.005 for r in rows)  # 4-bit rounding may zero a few more
    assert rows[1]["bops"] < rows[0]["bops"]  # same masks at most, half the weight bits
    assert (ref["task"], ref["metric_name"], ref["higher_is_better"]) == ("digits", "top1", True)
    assert ref["dense_history"] == [{"stage": "dense", "step": 0}]
    assert rows[0]["bops_ratio"] == pytest.approx(rows[0]["bops"] / ref["dense"]["bops"])
    # the dense model handed in is not modified
    assert not M.masked_modules(dense) and all(torch.equal(before[k], v) for k, v in dense.state_dict().items())

    for row in rows:
        run = tmp_path / row["run"]
        files = ["metrics.json", "model.json", "model.packed", "model.safetensors", "recipe.yaml", "timing.json"]
        assert sorted(p.name for p in run.iterdir()) == files
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["compressed"]["weight_bits"] == row["weight_bits"]
        assert metrics["pruned"]["metric"] == row["pruned_metric"] and metrics["compressed"]["metric"] == row["metric"]
        recipe = prunq.load_recipe(run / "recipe.yaml")
        assert (recipe.prune.sparsity, recipe.quant.weight_bits, recipe.quant.act_bits) == (0.5, row["weight_bits"], 8)
    loaded = prunq.load(tmp_path / "runs" / "s0.5_w4a8")
    assert {(r.weight_bits, r.act_bits) for r in prunq.layer_records(loaded)} == {(4, 8)}
    task = prunq.get_task("digits")
    assert task.evaluate(loaded)["metric"] == rows[1]["metric"]


@pytest.mark.parametrize("off", ["prune", "quant"])
def test_a_recipe_without_both_methods_is_refused(tmp_path, off):
    recipe = parse_recipe({**RECIPE, off: {"enabled": False}})
    with pytest.raises(PrunqError, match="sweep: the recipe needs a prune and a quantize method"):
        run_sweep(recipe, [0.5], [(4, 8)], tmp_path, quiet=True, render=False)
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_sweep_replaces_a_point_left_without_its_row_and_repeats_are_one_point(tmp_path):
    """The review's kill window: a point committed, its row not yet written. Resuming used to fail on the
    existing point directory (and the failure removed the whole work directory)."""
    from prunq.pipeline.checkpoint import WorkDir
    from prunq.pipeline.sweep import collect_points

    recipe = parse_recipe({**RECIPE, "model": {**RECIPE["model"], "kwargs": {"width": 0.25, "dropout": 0.3}}})
    dense = (build_model("digits", "digits_cnn", width=0.25, dropout=0.3), [])
    bits = [(8, 8), (4, 8), (8, 8)]
    ref, _ = run_sweep(recipe, [0.5, 0.7], bits, tmp_path / "ref", quiet=True, dense=dense, render=False)
    assert [r["run"] for r in ref] == ["runs/s0.5_w8a8", "runs/s0.5_w4a8", "runs/s0.7_w8a8", "runs/s0.7_w4a8"]
    work = WorkDir.open(tmp_path / "sw", "r", command="sweep", resume=False, every=0)
    run_sweep(recipe, [0.5, 0.7], bits, None, quiet=True, dense=dense, render=False, work=work)
    (work.path / "rows" / "s0.5_w4a8.json").unlink()  # killed between the point and its row
    (work.path / "rows" / "s0.7_w8a8.json").unlink()
    (work.path / "points" / "s0.7_w8a8").rename(work.path / "gone")  # killed before the point was kept
    again = WorkDir.open(tmp_path / "sw", "r", command="sweep", resume=True, every=0)
    rows, _ = run_sweep(recipe, [0.5, 0.7], bits, None, quiet=True, dense=dense, render=False, work=again)
    untimed = [[{k: v for k, v in r.items() if not k.endswith("_s")} for r in x] for x in (ref, rows)]
    assert untimed[0] == untimed[1]  # each point seeded by its name: the same numbers, dropout included
    collect_points(again, rows, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == sorted(r["run"][5:] for r in rows)
