"""The sweep's report (prunq.report.sweep): table, CSV with Pareto flags, plots; numbers by hand."""

from __future__ import annotations

import csv

from prunq.report.sweep import render_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_render_sweep(tmp_path):
    def row(run, s, wb, ab, metric, bops, mem):
        return {"run": run, "sparsity": s, "weight_bits": wb, "act_bits": ab, "metric": metric,
                "bops": bops, "memory_bits": mem, "bops_ratio": bops / 1e8, "memory_ratio": mem / 5e5}

    rows = [
        row("s90-w8a8", 0.90, 8, 8, 0.975, 6.4e5, 9000),   # front (BOPs)
        row("s98-w4a8", 0.98, 4, 8, 0.970, 6.4e4, 3000),   # front (BOPs)
        row("s98-w8a8", 0.98, 8, 8, 0.965, 1.3e5, 4000),   # dominated by s98-w4a8
        row("s50-w8a8", 0.50, 8, 8, 0.980, 3.2e6, 2500),   # front (BOPs); on memory cheapest and best: dominates all
        row("s99-w2a4", 0.99, 2, 4, 0.900, 1.0e4, 2600),   # front (BOPs), dominated on memory
    ]
    (tmp_path / "s98-w4a8").mkdir()
    (tmp_path / "s98-w4a8" / "report.md").write_text("# run\n")
    dense = {"metric": 0.981, "bops": 9.5e7, "memory_bits": 5e5}
    md = render_sweep(tmp_path, rows, "top1", True, dense=dense)
    assert md == tmp_path / "sweep.md"
    for name in ("pareto_bops.png", "pareto_memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC

    with open(tmp_path / "sweep.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["run"] for r in table] == ["s99-w2a4", "s98-w4a8", "s98-w8a8", "s90-w8a8", "s50-w8a8"]
    assert {r["run"] for r in table if r["pareto_bops"] == "1"} == {"s99-w2a4", "s98-w4a8", "s90-w8a8", "s50-w8a8"}
    assert {r["run"] for r in table if r["pareto_memory"] == "1"} == {"s50-w8a8"}
    assert float(table[0]["bops"]) == 1.0e4

    text = md.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "run" not in ln.split("|")[1]]
    assert len(lines) == 5
    stars = {}
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        stars[cells[0]] = (cells[-2], cells[-1])
    assert stars["`s98-w8a8`"] == ("", "")
    assert stars["[s98-w4a8](s98-w4a8/report.md)"] == ("★", "")
    assert stars["`s50-w8a8`"] == ("★", "★")
    assert "Dense fp32 reference: top-1 98.1 %" in text
    assert "](pareto_bops.png)" in text and "](pareto_memory.png)" in text


def test_render_sweep_lower_is_better_marks(tmp_path):
    rows = [{"run": "a", "metric": 2.0, "bops": 1e4, "memory_bits": 10},
            {"run": "b", "metric": 1.0, "bops": 1e5, "memory_bits": 20},
            {"run": "c", "metric": 3.0, "bops": 2e5, "memory_bits": 30}]
    render_sweep(tmp_path, rows, "epe", False)
    with open(tmp_path / "sweep.csv", newline="") as fh:
        flags = {r["run"]: r["pareto_bops"] for r in csv.DictReader(fh)}
    assert flags == {"a": "1", "b": "1", "c": "0"}
