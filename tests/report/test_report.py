"""Reports and sweep tables (prunq.report.report); plots and atomic writes have their own test modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prunq.core.errors import PrunqError
from prunq.report.plots import format_metric, run_label
from prunq.report.report import load_metrics, render_report, summary_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics() -> dict:
    """A hand-written metrics.json for a 3-layer digits model (numbers consistent with METHOD.md §4)."""
    layers = [
        # name, kind, params, nonzeros, macs, wb, ab
        ("conv1", "Conv2d", 144, 72, 9216, 8, 8),
        ("conv2", "Conv2d", 4608, 46, 73728, 4, 8),
        ("fc", "Linear", 10240, 205, 10240, 8, 8),
    ]
    recs = []
    for name, kind, n, nz, macs, wb, ab in layers:
        recs.append({
            "name": name, "kind": kind, "params": n, "nonzeros": nz, "density": nz / n, "macs": macs,
            "weight_bits": wb, "act_bits": ab, "bops": macs * nz / n * wb * ab,
            "memory_bits": nz * wb + n + 32, "encoding": "bitmap",
            "index_bits": {"dense": 0, "bitmap": n, "csr": nz * 7 + 33, "relative": nz * 5},
            "entropy_bits": 100.0,
        })
    dense_params = 144 + 4608 + 10240 + 16 + 32 + 10
    return {
        "task": "digits", "metric_name": "top1", "higher_is_better": True, "prunq_version": "0.1.0",
        "dense": {"metric": 0.981, "params": dense_params, "macs": 93184, "bops": 93184 * 1024,
                  "memory_bits": dense_params * 32},
        "pruned": {"metric": 0.975, "sparsity": 0.98},
        "compressed": {"metric": 0.978, "sparsity": 0.98, "weight_bits": 4, "act_bits": 8,
                       "bops": 51234.0, "memory_bits": 21000, "middlebury": {"epe": 1.5, "d1": 0.12}},
        "memory_ratio": 0.012, "bops_ratio": 0.0006, "memory_ratio_int8": 0.048, "bops_ratio_int8": 0.0096,
        "memory_bits_by_encoding": {"dense": 80000, "bitmap": 21000, "csr": 24000, "relative": 22000,
                                    "best": 20500},
        "entropy_bound_bits": 1234.5,
        "layers": recs,
        "history": [
            {"stage": "dense", "step": 0, "loss": 2.3, "metric": 0.2},
            {"stage": "dense", "step": 10, "loss": 0.3, "metric": 0.97},
            {"stage": "prune", "step": 0, "loss": 0.9, "sparsity": 0.8},
            {"stage": "prune", "step": 10, "loss": 0.4, "metric": 0.96, "sparsity": 0.98},
            {"stage": "quant", "step": 0, "loss": 0.5, "sparsity": 0.98},
            {"stage": "quant", "step": 5, "loss": 0.35, "metric": 0.978, "sparsity": 0.98},
        ],
        "timing": {"dense_s": 3.2, "prune_s": 75.0, "quant_s": 4000.0, "total_s": 4078.2},
    }


def _write_run(tmp_path: Path, metrics: dict, recipe: str | None = "task: digits\nmodel: {name: lenet}\n") -> Path:
    """A run as prunq writes it: the timings in timing.json, beside metrics.json."""
    run = tmp_path / "run"
    run.mkdir()
    metrics = dict(metrics)
    if "timing" in metrics:
        (run / "timing.json").write_text(json.dumps(metrics.pop("timing")))
    (run / "metrics.json").write_text(json.dumps(metrics))
    if recipe is not None:
        (run / "recipe.yaml").write_text(recipe)
    return run


# --------------------------------------------------------------------------------------------------
# render_report / load_metrics
# --------------------------------------------------------------------------------------------------


def test_render_report(tmp_path):
    run = _write_run(tmp_path, _metrics())
    report = render_report(run)
    assert report == run / "report.md"
    text = report.read_text()
    assert text.startswith("# prunq report: digits")
    assert "98.0 % sparse, w4a8: top-1 97.8 % (dense 98.1 %), memory ×0.012, BOPs ×0.0006" in text
    for name in ("`conv1`", "`conv2`", "`fc`"):
        assert name in text
    assert "10,240" in text  # thousands separators in the layer table
    assert "0.998 %" in text  # conv2 density 46 / 4608, 3 significant digits
    assert "9.54e7" in text  # dense BOPs 93,184 * 1024, scientific
    assert "× int8" in text and "0.0096" in text
    assert "1,234 bits" in text or "1,235 bits" in text  # entropy bound
    assert "`middlebury.epe`" in text and "1.5 px" in text and "12.0 %" in text
    assert "1 h 07 min" in text  # total 4078 s
    assert "```yaml\ntask: digits\nmodel: {name: lenet}\n```" in text
    for png in ("plots/layers.png", "plots/stages.png"):
        assert f"]({png})" in text
        assert (run / png).read_bytes()[:8] == PNG_MAGIC
    assert not [p.name for p in run.rglob(".*")]  # no temporaries left behind


def test_timings_of_older_runs_are_read_from_metrics_json_and_a_broken_timing_json_is_left_out(tmp_path):
    run = _write_run(tmp_path, _metrics())
    (run / "metrics.json").write_text(json.dumps(_metrics()))  # before timing.json existed
    (run / "timing.json").unlink()
    assert "1 h 07 min" in render_report(run).read_text()
    (run / "timing.json").write_text("{not json")
    text = render_report(run).read_text()
    assert "## Timing" not in text and "## Headline" in text


def test_render_report_minimal_metrics(tmp_path):
    """Only the §5 keys: optional sections are left out, nothing crashes."""
    m = _metrics()
    for k in ("memory_bits_by_encoding", "entropy_bound_bits", "history", "timing",
              "memory_ratio_int8", "bops_ratio_int8", "prunq_version"):
        del m[k]
    for layer in m["layers"]:
        for k in ("kind", "density", "bops", "memory_bits", "encoding", "index_bits", "entropy_bits"):
            del layer[k]
    m["compressed"]["act_bits"] = None
    run = _write_run(tmp_path, m, recipe=None)
    text = render_report(run).read_text()
    assert "w4a32" in text
    assert "Memory by index encoding" not in text and "## Timing" not in text and "## Recipe" not in text
    assert "50 %" in text  # conv1 density computed from non-zeros / params
    assert (run / "plots" / "stages.png").read_bytes()[:8] == PNG_MAGIC


def test_load_metrics_missing_keys(tmp_path):
    m = _metrics()
    del m["bops_ratio"]
    del m["dense"]["bops"]
    del m["layers"][1]["macs"]
    run = _write_run(tmp_path, m)
    with pytest.raises(PrunqError) as err:
        load_metrics(run)
    msg = str(err.value)
    assert str(run / "metrics.json") in msg
    for key in ("bops_ratio", "dense.bops", "layers[1].macs"):
        assert key in msg
    with pytest.raises(PrunqError, match="metrics.json"):
        render_report(run)
    assert not (run / "report.md").exists()


def test_load_metrics_corrupt_or_absent(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(PrunqError, match=r"metrics\.json: not found"):
        load_metrics(run)
    (run / "metrics.json").write_text('{"task": "digits", ')
    with pytest.raises(PrunqError, match=r"metrics\.json: not valid JSON"):
        load_metrics(run)
    (run / "metrics.json").write_text("[1, 2]")
    with pytest.raises(PrunqError, match=r"metrics\.json: expected a JSON object"):
        load_metrics(run)
    with pytest.raises(PrunqError, match="no such run directory"):
        load_metrics(tmp_path / "nope")


def test_summary_line_lower_is_better():
    m = {"metric_name": "epe", "dense": {"metric": 1.204}, "memory_ratio": 0.01234, "bops_ratio": 0.00061,
         "compressed": {"metric": 1.25, "sparsity": 0.9996, "weight_bits": 2, "act_bits": 4}}
    assert summary_line(m) == "99.96 % sparse, w2a4: EPE 1.25 px (dense 1.2 px), memory ×0.0123, BOPs ×0.00061"
    assert format_metric(None, "top1") == "—"
    assert run_label({"sparsity": 0.98, "weight_bits": 4, "act_bits": 8}) == "s=0.98 w4a8"


def test_no_heavy_imports():
    """``prunq report`` must start fast: no torch, and matplotlib only once a plot is drawn."""
    code = ("import sys, prunq.report.report, prunq.report.sweep, prunq.report.plots, prunq.report.fsutil; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"



# --------------------------------------------------------------------------------------------------
# hostile numbers: the report renders (a dash for an unusable value) or gives one line, never a traceback
# --------------------------------------------------------------------------------------------------

_BIG = "1" + "0" * 400  # an integer JSON allows and float() cannot hold


def _set(m: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        m = m[int(p)] if isinstance(m, list) else m[p]
    if isinstance(m, list):
        m[int(leaf)] = value
    else:
        m[leaf] = value


HOSTILE_NUMBERS = [
    # (changes, text in the rendered metrics.json replaced after dumping, what report.md shows)
    ({"dense.params": "BIG", "compressed.bops": "BIG", "layers.0.macs": "BIG", "history.1.loss": "BIG",
      "layers.0.index_bits.csr": "BIG", "compressed.middlebury.epe": "BIG"}, "| dense | 98.1 %"),
    ({"dense.metric": "INF", "compressed.memory_bits": "INF", "layers.1.density": "NAN", "history.1.step": "NAN",
      "bops_ratio": "INF"}, "| dense | inf |"),
    ({"dense.metric": 1.7e308, "pruned.metric": -1.7e308, "history.1.loss": 1.7e308, "history.1.step": -1e308},
     "| pruned | — |"),
    ({"compressed.weight_bits": "4", "layers.0.weight_bits": [4], "layers.1.act_bits": {"a": 1},
      "layers.0.params": -1, "layers.2.nonzeros": True}, "w—a8"),
    ({"layers.0.encoding": ["csr"], "layers.1.index_bits": 7, "history": 3.5, "memory_bits_by_encoding.best": "12"},
     "| `conv1` |"),
    ({"dense.bops": 10**30, "layers.0.params": 10**30, "history.3.sparsity": 10**30}, "1.00e30"),
]  # fmt: skip


@pytest.mark.parametrize("changes, shown", HOSTILE_NUMBERS, ids=range(len(HOSTILE_NUMBERS)))
def test_huge_or_mistyped_numbers_render_with_a_dash(tmp_path, changes, shown):
    m = _metrics()
    for path, value in changes.items():
        _set(m, path, value)
    run = _write_run(tmp_path, m)
    text = (run / "metrics.json").read_text()
    text = text.replace('"BIG"', _BIG).replace('"INF"', "Infinity").replace('"NAN"', "NaN")
    (run / "metrics.json").write_text(text)
    report = render_report(run).read_text()
    assert shown in report
    assert (run / "plots" / "layers.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"task": ' + "9" * 5000 + "}", "not valid JSON (Exceeds the limit"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply)"),
    ],
)
def test_unreadable_numbers_in_metrics_are_one_line(tmp_path, text, message):
    (tmp_path / "metrics.json").write_text(text)
    with pytest.raises(PrunqError) as e:
        load_metrics(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value) and "metrics.json" in str(e.value)


def test_the_files_section_shows_real_bytes_beside_the_cost_models_figure(tmp_path):
    m = _metrics()
    m["files"] = {"dense_fp32_bytes": 643104, "packed_bytes": 7753, "cost_model_bytes": 7411.375}
    text = render_report(_write_run(tmp_path, m)).read_text()
    assert "## Files" in text and "643,104" in text and "7,753" in text and "1.21 %" in text
    assert "1.046× the cost model's figure" in text
    m["files"] = {"dense_fp32_bytes": "x", "packed_error": "packed: layer 'a' shares its weight"}
    (tmp_path / "run").rename(tmp_path / "old")
    text = render_report(_write_run(tmp_path, m)).read_text()
    assert "## Files" not in text  # nothing usable to show


def test_activation_products_are_shown_beside_weight_bops(tmp_path):
    m = _metrics()
    m["compressed"].update(weight_bops=3.0e6, act_bops=1.0e6)
    m["act_sites"] = [{"name": "group_correlation:mul", "kind": "act*act", "bits": [32, 32], "macs": 1000, "bops": 1.0e6},
                      {"name": "bad", "bits": "x", "macs": "y"}]  # fmt: skip
    text = render_report(_write_run(tmp_path, m)).read_text()
    assert "weight × activation 3e+06 + activation × activation 1e+06 (25.0 %)" in text
    assert "`group_correlation:mul` | act*act | 32×32 | 1,000 | 1e+06" in text
    (tmp_path / "run").rename(tmp_path / "old")
    m["compressed"]["act_bops"] = 0.0
    m["act_sites"] = []
    assert "## Bit-operations" not in render_report(_write_run(tmp_path, m)).read_text()
