"""The sweep's report: ``sweep.md``, ``sweep.csv`` and the Pareto plots of a grid of runs.

Written atomically, links relative (see :mod:`prunq.report.report`). No torch or matplotlib at import time.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prunq.report.fsutil import atomic_write_text
from prunq.report.markdown import _DASH, _bits, _kib, _ratio, _sci, _sparsity, _table
from prunq.report.plots import finite, format_metric, metric_label, pareto_front, plot_pareto

__all__ = ["SWEEP_COLUMNS", "render_sweep"]

#: Column order of ``sweep.csv`` (extra keys found in the rows follow, then the Pareto flags).
SWEEP_COLUMNS = ("run", "sparsity", "weight_bits", "act_bits", "metric", "bops", "memory_bits",
                 "bops_ratio", "memory_ratio")


def _bops_sort_key(item: tuple[int, Mapping[str, Any]]) -> tuple[int, float, int]:
    i, row = item
    b = finite(row.get("bops"))
    return (0, b, i) if b is not None else (1, 0.0, i)


def render_sweep(
    out_dir: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    metric_name: str,
    higher_is_better: bool,
    dense: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``sweep.csv``, ``sweep.md``, ``pareto_bops.png`` and ``pareto_memory.png`` into ``out_dir``.

    ``rows`` hold ``sparsity, weight_bits, act_bits, metric, bops, memory_bits, bops_ratio,
    memory_ratio, run`` (the run's sub-directory; linked when it has a ``report.md``). Both outputs list
    the runs by ascending BOPs; ★ marks the Pareto-optimal runs for the metric vs BOPs (and, in a second
    column, vs memory). ``dense`` (``metric, bops, memory_bits``) is drawn as the "dense fp32" reference
    point. Returns the path of ``sweep.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    front_bops = set(pareto_front(rows, "bops", "metric", higher_is_better))
    front_mem = set(pareto_front(rows, "memory_bits", "metric", higher_is_better))
    order = [i for i, _ in sorted(enumerate(rows), key=_bops_sort_key)]

    # CSV: raw values, full precision, same order as the table.
    columns = list(SWEEP_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*columns, "pareto_bops", "pareto_memory"])
    for i in order:
        row = rows[i]
        writer.writerow([("" if row.get(k) is None else row.get(k)) for k in columns]
                        + [int(i in front_bops), int(i in front_mem)])
    atomic_write_text(out_dir / "sweep.csv", buf.getvalue())

    refs = []
    if dense is not None:
        refs.append({"label": "dense fp32", "metric": dense.get("metric"), "bops": dense.get("bops"),
                     "memory_bits": dense.get("memory_bits")})
    plot_pareto(rows, "bops", "metric", out_dir / "pareto_bops.png", metric_name, higher_is_better,
                references=refs)
    plot_pareto(rows, "memory_bits", "metric", out_dir / "pareto_memory.png", metric_name,
                higher_is_better, references=refs)

    label = metric_label(metric_name)
    table_rows = []
    for i in order:
        row = rows[i]
        run = row.get("run")
        run_cell = _DASH if run is None else f"`{run}`"
        if run is not None and (out_dir / str(run) / "report.md").is_file():
            run_cell = f"[{run}]({run}/report.md)"
        table_rows.append([
            run_cell, _sparsity(row.get("sparsity")), _bits(row), format_metric(row.get("metric"), metric_name),
            _sci(row.get("bops")), _ratio(row.get("bops_ratio")), _kib(row.get("memory_bits")),
            _ratio(row.get("memory_ratio")), "★" if i in front_bops else "", "★" if i in front_mem else "",
        ])
    headers = ["run", "sparsity", "bits", label, "BOPs", "BOPs × fp32", "memory (KiB)", "memory × fp32",
               "Pareto (BOPs)", "Pareto (memory)"]
    better = "higher" if higher_is_better else "lower"
    parts = [f"# Sweep: {label} vs cost", "",
             f"{len(rows)} runs, sorted by BOPs. ★ in *Pareto (BOPs)* marks the runs no other run beats: "
             f"none has fewer-or-equal BOPs and a {better}-or-equal {label} with one of them strictly "
             f"better. *Pareto (memory)* does the same with memory.", ""]
    if dense is not None:
        parts += [f"Dense fp32 reference: {label} {format_metric(dense.get('metric'), metric_name)}, "
                  f"{_sci(dense.get('bops'))} BOPs, {_kib(dense.get('memory_bits'))} KiB.", ""]
    parts += [_table(headers, table_rows, "lrlrrrrrcc"),
              "", f"![{label} vs BOPs](pareto_bops.png)", "", f"![{label} vs memory](pareto_memory.png)", ""]
    return atomic_write_text(out_dir / "sweep.md", "\n".join(parts))
