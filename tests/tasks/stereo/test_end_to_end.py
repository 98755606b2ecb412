"""A tiny stereo compression through the real CLI: metrics per the issue's contract, the motorcycle pictures
in the report, the shipped recipe at a toy budget, and `prunq evaluate` reproducing the recorded EPE."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prunq.pipeline.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[3]
KEYS = {"epe", "d1", "bad1", "bad2", "bad3"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "prunq", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """recipes/stereo.yaml itself, cut to a toy budget and size with --set (about 10 s)."""
    out = tmp_path_factory.mktemp("stereo") / "run"
    sets = {
        "task.options": {"height": 64, "width": 160, "max_disp": 32, "n_train": 12, "n_val": 3},
        "model.kwargs": {"width": 0.5}, "dense.steps": 15, "eval_every": 0, "prune.finetune.steps": 12,
        "prune.score_batches": 2, "quant.finetune.steps": 4, "quant.calib_batches": 2,
    }  # fmt: skip
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    proc = _cli("compress", ROOT / "recipes" / "stereo.yaml", "--out", out, "--quiet", *args)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_metrics_follow_the_stereo_contract(run):
    m = json.loads((run / "metrics.json").read_text())
    assert (m["task"], m["metric_name"], m["higher_is_better"]) == ("stereo", "epe", False)
    for stage in ("dense", "pruned", "compressed"):
        assert set(m[stage]["middlebury"]) == KEYS and set(m[stage]["val"]) == KEYS
        assert m[stage]["metric"] == m[stage]["val"]["epe"]  # the headline is the validation EPE
        assert all(math.isfinite(v) for v in m[stage]["middlebury"].values())
    assert m["compressed"]["sparsity"] >= 0.95 - 1e-3
    assert (m["compressed"]["weight_bits"], m["compressed"]["act_bits"]) == (4, 8)
    assert 0 < m["memory_ratio"] < 1 and 0 < m["bops_ratio"] < 1


@pytest.mark.slow
def test_report_shows_the_motorcycle_predictions(run):
    text = (run / "report.md").read_text()
    assert "## Predictions" in text and "](plots/middlebury.png)" in text
    for name in ("middlebury", "middlebury_left", "middlebury_gt", "middlebury_dense", "middlebury_compressed",
                 "middlebury_dense_error", "middlebury_compressed_error"):  # fmt: skip
        assert (run / "plots" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC, name
    # `prunq report` re-renders them from the saved previews
    for png in (run / "plots").glob("middlebury*.png"):
        png.unlink()
    assert _cli("report", run).returncode == 0
    assert (run / "plots" / "middlebury.png").is_file()


@pytest.mark.slow
def test_evaluate_reproduces_the_recorded_epe(run):
    proc = _cli("evaluate", run)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["metric"] == pytest.approx(res["recorded"], rel=1e-6)


def test_shipped_stereo_recipe_is_the_issue_default():
    r = load_recipe(ROOT / "recipes" / "stereo.yaml")
    assert (r.task.name, r.model.name) == ("stereo", "stereo_net")
    assert r.prune.criterion == "taylor" and r.prune.mode == "soft" and r.prune.sparsity >= 0.95
    assert (r.quant.weight_bits, r.quant.act_bits) == (4, 8)
    assert yaml.safe_load((ROOT / "recipes" / "stereo.yaml").read_text())["task"]["options"]["max_disp"] >= 64
