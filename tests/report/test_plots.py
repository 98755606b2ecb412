"""Plots (prunq.report.plots): the pure helpers worked out by hand, and every plot written as a PNG."""

from __future__ import annotations

import doctest
import sys

import prunq.report.plots as plots
from prunq.report.plots import (
    finite,
    format_metric,
    metric_label,
    pareto_front,
    plot_layers,
    plot_pareto,
    plot_stages,
    run_label,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pts(pairs):
    return [{"bops": x, "metric": y} for x, y in pairs]


def test_pareto_front_higher_is_better():
    rows = _pts([(10, 0.90), (20, 0.95), (30, 0.93), (5, 0.80), (40, 0.99), (25, 0.95)])
    # (30, .93) is beaten by (20, .95); (25, .95) ties on metric but costs more than (20, .95).
    assert pareto_front(rows, "bops", "metric", True) == [3, 0, 1, 4]


def test_pareto_front_lower_is_better():
    rows = _pts([(10, 2.0), (20, 1.5), (30, 1.8), (5, 3.0), (40, 1.0)])
    assert pareto_front(rows, "bops", "metric", False) == [3, 0, 1, 4]
    # flipping the direction: only the cheapest survives when it is also the best
    assert pareto_front(_pts([(1, 1.0), (2, 2.0)]), "bops", "metric", False) == [0]
    assert pareto_front(_pts([(1, 1.0), (2, 2.0)]), "bops", "metric", True) == [0, 1]


def test_pareto_front_ties_and_missing():
    # exact duplicates are both optimal; same x with worse y is dominated; same y with more x too
    rows = _pts([(10, 0.9), (10, 0.9), (10, 0.8), (12, 0.9), (None, 1.0), (8, float("nan"))])
    assert pareto_front(rows, "bops", "metric", True) == [0, 1]
    assert pareto_front([], "bops", "metric", True) == []


def test_formatting_helpers():
    assert format_metric(0.97841, "top1") == "97.8 %"  # a fraction shown as a percentage, one decimal
    assert format_metric(0.5, "D1") == "50.0 %"  # case-insensitive: D1 is a fraction
    assert format_metric(1.2345, "epe") == "1.23 px"  # 3 significant digits
    assert format_metric(0.123456, "miou") == "0.1235"  # unknown metric: 4 significant digits, no unit
    assert format_metric(float("inf"), "top1") == "inf"  # not finite: shown as is, never as a percentage
    assert format_metric(True, "top1") == format_metric("0.9", "top1") == "—"  # not a number
    assert (metric_label("TOP1"), metric_label("epe"), metric_label("miou")) == ("top-1", "EPE", "miou")
    assert finite(2**70) == float(2**70) and finite(float("-inf")) is None
    assert run_label({}) == "" and run_label({"weight_bits": 2}) == "w2"
    assert run_label({"sparsity": 0.99951, "act_bits": 8}) == "s=1 a8"  # 3 significant digits


def test_history_steps_continue_across_stages():
    # Each stage restarts its step count; x is shifted so that it continues the previous stage:
    # dense 0, 100 | prune 0 -> 100 (offset 100), 10 -> 110 | quant 0 -> 110 (offset 110), 5 -> 115,
    # an entry without a step goes one past the last x -> 116.
    history = [
        {"stage": "dense", "step": 0}, {"stage": "dense", "step": 100},
        {"stage": "prune", "step": 0}, {"stage": "prune", "step": 10},
        {"stage": "quant", "step": 0}, {"stage": "quant", "step": 5}, {"stage": "quant"},
    ]  # fmt: skip
    assert plots._history_x(history) == [0, 100, 100, 110, 110, 115, 116]
    assert plots._stage_segments(history) == [("dense", [0, 1]), ("prune", [2, 3]), ("quant", [4, 5, 6])]


def test_every_plot_is_a_png_even_with_nothing_to_draw(tmp_path):
    pyplot = sys.modules.get("matplotlib.pyplot")
    figures = pyplot.get_fignums() if pyplot is not None else None
    paths = [
        plot_layers([], tmp_path / "layers.png"),
        plot_stages({"metric_name": "epe", "higher_is_better": False}, tmp_path / "stages.png"),
        # no point can sit on the log axis: x missing, zero or negative
        plot_pareto([{"bops": 0, "metric": 1.0}, {"metric": 2.0}, {"bops": -5, "metric": 3.0}], "bops", "metric",
                    tmp_path / "pareto.png", "epe", False),
    ]  # fmt: skip
    assert paths == [tmp_path / "layers.png", tmp_path / "stages.png", tmp_path / "pareto.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.png", "pareto.png", "stages.png"]  # no temporaries
    if pyplot is not None:  # drawn on Agg canvases: nothing leaks into pyplot's figure registry
        assert pyplot.get_fignums() == figures


def test_docstring_examples():
    result = doctest.testmod(plots, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
