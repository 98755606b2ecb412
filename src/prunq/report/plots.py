"""PNG plots of a run and of a sweep: per-layer density and bits, metric by stage, Pareto fronts.

matplotlib is imported inside the plotting functions only (``import prunq.report.plots`` stays cheap), and
figures are drawn with the object-oriented API on an Agg canvas -- ``Figure`` + ``FigureCanvasAgg``
rather than ``pyplot`` -- so plotting never switches the caller's backend, never needs a display and
never leaks figures into pyplot's global registry. Every plot is written atomically
(:func:`prunq.report.fsutil.atomic_write_bytes`) and the function returns the PNG's path.

The pure helpers (:func:`pareto_front`, :func:`format_metric`, :func:`metric_label`) are shared with
:mod:`prunq.report.report`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunq.report.fsutil import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "finite",
    "format_metric",
    "is_percent_metric",
    "metric_label",
    "pareto_front",
    "plot_layers",
    "plot_pareto",
    "plot_stages",
    "run_label",
]

DPI = 110

#: Metrics that are fractions in [0, 1] and read best as percentages.
_PERCENT_METRICS = frozenset({"top1", "top5", "accuracy", "acc", "d1", "bad1", "bad2", "bad3"})
#: Metrics measured in pixels.
_PIXEL_METRICS = frozenset({"epe"})
_LABELS = {
    "top1": "top-1",
    "top5": "top-5",
    "accuracy": "accuracy",
    "acc": "accuracy",
    "epe": "EPE",
    "d1": "D1",
    "bad1": "bad-1",
    "bad2": "bad-2",
    "bad3": "bad-3",
}
#: Colour per pipeline stage; the history's stage names map onto the same three.
_STAGE_COLOURS = {"dense": "tab:blue", "prune": "tab:orange", "pruned": "tab:orange",
                  "quant": "tab:green", "compressed": "tab:green"}
_X_LABELS = {"bops": "BOPs (bit-operations)", "memory_bits": "memory (bits)"}


# --------------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------------


#: Larger magnitudes are treated as unusable (a dash in tables, a gap in plots): arithmetic on them
#: (sums, axis limits) overflows to inf; no cost or metric of a real model comes near.
MAX_MAGNITUDE = 1e100


def finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite real number (not a bool) of magnitude at most
    :data:`MAX_MAGNITUDE`, else ``None``.

    >>> finite(3), finite("3"), finite(float("nan")), finite(None), finite(True), finite(10**400)
    (3.0, None, None, None, None, None)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        v = float(value)
    except OverflowError:  # an integer beyond float range (JSON allows 10^400)
        return None
    return v if math.isfinite(v) and abs(v) <= MAX_MAGNITUDE else None


def _bits_value(v: Any) -> str | None:
    """A bit-width for display: an integer (``4``), or None when absent or unusable (``"4"``, a list)."""
    f = finite(v)
    return None if f is None or f != int(f) else str(int(f))


def is_percent_metric(metric_name: str) -> bool:
    """Whether ``metric_name`` is a fraction best shown as a percentage (top-1, D1, bad-N...).

    >>> is_percent_metric("top1"), is_percent_metric("epe")
    (True, False)
    """
    return metric_name.lower() in _PERCENT_METRICS


def metric_label(metric_name: str) -> str:
    """Human name of a metric: ``"top1" -> "top-1"``, ``"epe" -> "EPE"``; unknown names pass through.

    >>> metric_label("top1"), metric_label("miou")
    ('top-1', 'miou')
    """
    return _LABELS.get(metric_name.lower(), metric_name)


def _metric_unit(metric_name: str) -> str:
    if is_percent_metric(metric_name):
        return "%"
    if metric_name.lower() in _PIXEL_METRICS:
        return "px"
    return ""


def format_metric(value: Any, metric_name: str) -> str:
    """A metric value for people: percentages for fractions, pixels for EPE, ``—`` when absent.

    >>> format_metric(0.978, "top1"), format_metric(1.2345, "epe"), format_metric(None, "top1")
    ('97.8 %', '1.23 px', '—')
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    v = finite(value)
    if v is None:  # too large to be a metric
        return "—"
    if is_percent_metric(metric_name):
        return f"{100.0 * v:.1f} %"
    if metric_name.lower() in _PIXEL_METRICS:
        return f"{v:.3g} px"
    return f"{v:.4g}"


def _axis_label(metric_name: str, higher_is_better: bool) -> str:
    unit = _metric_unit(metric_name)
    arrow = "↑ better" if higher_is_better else "↓ better"
    return f"{metric_label(metric_name)}" + (f" ({unit})" if unit else "") + f"  [{arrow}]"


def _metric_scale(metric_name: str) -> float:
    return 100.0 if is_percent_metric(metric_name) else 1.0


def _short_float(v: float) -> str:
    return f"{v:.3g}"


def run_label(row: Mapping[str, Any]) -> str:
    """The short name of one (sparsity, bits) point: ``"s=0.98 w4a8"``; parts that are absent are left out.

    >>> run_label({"sparsity": 0.98, "weight_bits": 4, "act_bits": 8})
    's=0.98 w4a8'
    >>> run_label({"sparsity": 0.5, "weight_bits": 4, "act_bits": None})
    's=0.5 w4'
    """
    parts = []
    s = finite(row.get("sparsity"))
    if s is not None:
        parts.append(f"s={_short_float(s)}")
    wb, ab = _bits_value(row.get("weight_bits")), _bits_value(row.get("act_bits"))
    bits = ""
    if wb is not None:
        bits += f"w{wb}"
    if ab is not None:
        bits += f"a{ab}"
    if bits:
        parts.append(bits)
    return " ".join(parts)


def pareto_front(
    rows: Sequence[Mapping[str, Any]], x_key: str, y_key: str, higher_is_better: bool
) -> list[int]:
    """Indices of the Pareto-optimal rows: lower ``x_key`` is better, ``y_key`` better per ``higher_is_better``.

    A row is on the front when no other row is at least as good on both and strictly better on one.
    Exact duplicates of a front point are therefore *all* on the front (neither dominates the other).
    Rows whose ``x_key`` or ``y_key`` is missing or not finite are ignored. The result is ordered by
    ascending ``x`` (then input order), i.e. the order in which to draw the front.

    >>> pts = [{"b": 1, "m": 0.90}, {"b": 2, "m": 0.95}, {"b": 3, "m": 0.93}, {"b": 2, "m": 0.95}]
    >>> pareto_front(pts, "b", "m", higher_is_better=True)
    [0, 1, 3]
    >>> pareto_front(pts, "b", "m", higher_is_better=False)
    [0]
    """
    sign = 1.0 if higher_is_better else -1.0
    pts: list[tuple[float, float, int]] = []
    for i, row in enumerate(rows):
        x, y = finite(row.get(x_key)), finite(row.get(y_key))
        if x is not None and y is not None:
            pts.append((x, sign * y, i))  # after the sign flip, higher y is always better
    # Sweep by ascending x; inside one x, best y first. A point is optimal iff it has the best y of
    # its x-group and that y beats every y seen at a strictly smaller x.
    pts.sort(key=lambda p: (p[0], -p[1], p[2]))
    front: list[int] = []
    best_so_far = -math.inf
    k = 0
    while k < len(pts):
        x0, y_top, _ = pts[k]
        group_end = k
        while group_end < len(pts) and pts[group_end][0] == x0:
            group_end += 1
        if y_top > best_so_far:
            front.extend(i for _, y, i in pts[k:group_end] if y == y_top)
            best_so_far = y_top
        k = group_end
    return front


# --------------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    """A Figure on an Agg canvas with constrained (tight) layout; no pyplot involved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return atomic_write_bytes(path, buf.getvalue())


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _density(layer: Mapping[str, Any]) -> float | None:
    d = finite(layer.get("density"))
    if d is not None:
        return d
    n, nz = finite(layer.get("params")), finite(layer.get("nonzeros"))
    if n and nz is not None:
        return nz / n
    return None


def _pct_tick(v: float, _pos: object = None) -> str:
    return f"{100.0 * v:g} %"


def plot_layers(layers: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Per-layer density (log-scale bars, so 0.2 % and 100 % are both readable) and weight/activation bits.

    ``layers`` are the ``metrics.json`` layer records (``name``, ``params``, ``nonzeros`` or ``density``,
    ``weight_bits``, ``act_bits``); missing values leave a gap. Returns ``path``.

    >>> import tempfile; from pathlib import Path
    >>> p = plot_layers([{"name": "fc", "params": 100, "nonzeros": 2, "weight_bits": 4, "act_bits": 8}],
    ...                 Path(tempfile.mkdtemp()) / "layers.png")
    >>> p.read_bytes()[:4]
    b'\\x89PNG'
    """
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    n = len(layers)
    fig = _figure(min(max(6.5, 0.34 * n + 2.5), 32.0), 6.2)
    ax_d, ax_b = fig.subplots(2, 1, sharex=True, height_ratios=[2.0, 1.0])
    if n == 0:
        _empty(ax_d, "no layers")
        ax_b.set_visible(False)
        return _save(fig, path)

    names = [str(layer.get("name", f"#{i}")) for i, layer in enumerate(layers)]
    dens = [_density(layer) for layer in layers]
    known = [d for d in dens if d is not None and d > 0]
    floor = max(min([1e-3, *known]) / 2.0, 1e-12)  # bottom of the log axis; a zero-density layer is drawn at it
    heights = [math.nan if d is None else max(d, floor) for d in dens]
    xs = list(range(n))

    ax_d.bar(xs, heights, color="tab:blue", width=0.7, label="density (non-zeros / weights)")
    ax_d.set_yscale("log")
    ax_d.set_ylim(floor, 1.6)
    ax_d.yaxis.set_major_formatter(FuncFormatter(_pct_tick))
    ax_d.yaxis.set_minor_formatter(NullFormatter())
    ax_d.set_ylabel("density (log scale)")
    ax_d.grid(axis="y", which="major", alpha=0.3)
    nz_total = sum(finite(layer.get("nonzeros")) or 0.0 for layer in layers)
    n_total = sum(finite(layer.get("params")) or 0.0 for layer in layers)
    if n_total > 0 and nz_total > 0:
        overall = nz_total / n_total
        ax_d.axhline(overall, color="tab:red", ls="--", lw=1,
                     label=f"overall {100 * overall:.3g} % (sparsity {100 * (1 - overall):.3g} %)")
    if n <= 48:
        for x, d in zip(xs, dens):
            if d is not None:
                ax_d.annotate(f"{100 * d:.2g}", (x, max(d, floor)), xytext=(0, 2),
                              textcoords="offset points", ha="center", va="bottom", fontsize=6.5)
    # Legends sit above their panels, where they cannot hide a bar.
    ax_d.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2, fontsize=8, frameon=False)
    fig.suptitle("Per-layer density (non-zeros / weights, %) and bit-widths", fontsize=11)

    wb = [finite(layer.get("weight_bits")) for layer in layers]
    ab = [finite(layer.get("act_bits")) for layer in layers]
    w = 0.38
    ax_b.bar([x - w / 2 for x in xs], [math.nan if b is None else b for b in wb], width=w,
             color="tab:purple", label="weight bits")
    ax_b.bar([x + w / 2 for x in xs], [math.nan if b is None else b for b in ab], width=w,
             color="tab:gray", label="activation bits")
    top = max([8.0, *(b for b in wb + ab if b is not None)])
    ax_b.set_ylim(0, top * 1.12)
    ax_b.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
    ax_b.set_ylabel("bits")
    ax_b.grid(axis="y", alpha=0.3)
    ax_b.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, fontsize=8, frameon=False)
    ax_b.set_xticks(xs, names, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax_b.set_xlim(-0.6, n - 0.4)
    return _save(fig, path)


def _bits_text(section: Mapping[str, Any]) -> str:
    wb, ab = section.get("weight_bits"), section.get("act_bits")
    if wb is None and ab is None:
        return ""
    return f"w{_bits_value(wb) or '?' if wb is not None else 32}a{_bits_value(ab) or '?' if ab is not None else 32}"


def _history_x(history: Sequence[Mapping[str, Any]]) -> list[float]:
    """One x per history entry; steps that restart at a new stage are shifted to continue the last one."""
    xs: list[float] = []
    offset = 0.0
    last = -math.inf
    prev_stage = None
    for entry in history:
        step = finite(entry.get("step"))
        stage = entry.get("stage")
        if step is None:
            x = last + 1 if math.isfinite(last) else 0.0
        else:
            if stage != prev_stage and math.isfinite(last) and step + offset < last:
                offset = last - step
            x = step + offset
        xs.append(x)
        last = max(last, x)
        prev_stage = stage
    return xs


def _stage_segments(history: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[int]]]:
    """Consecutive runs of the same stage, as (stage, indices)."""
    segs: list[tuple[str, list[int]]] = []
    for i, entry in enumerate(history):
        stage = str(entry.get("stage", "?"))
        if segs and segs[-1][0] == stage:
            segs[-1][1].append(i)
        else:
            segs.append((stage, [i]))
    return segs


def plot_stages(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """The metric at dense → pruned → compressed, plus the fine-tuning curves from ``history`` if any.

    Left: one point per stage with its value written next to it (and the dense value as a dashed
    reference). Right (only if ``history`` has entries): loss and/or metric against the step, coloured
    by stage, with sparsity on a twin axis. Returns ``path``.
    """
    metric_name = str(metrics.get("metric_name", "metric"))
    hib = bool(metrics.get("higher_is_better", True))
    scale = _metric_scale(metric_name)
    history = metrics.get("history")
    history = [h for h in history if isinstance(h, Mapping)] if isinstance(history, list) else []
    has_loss = any(finite(h.get("loss")) is not None for h in history)
    has_hmetric = any(finite(h.get(k)) is not None for h in history for k in ("metric", "val_metric"))
    n_panels = 1 + int(has_loss) + int(has_hmetric)
    ratios = [1.2] + [2.0] * (n_panels - 1)
    fig = _figure(4.2 + 4.6 * (n_panels - 1), 4.4)
    axes = fig.subplots(1, n_panels, width_ratios=ratios, squeeze=False)[0]

    # --- metric by stage ---------------------------------------------------------------------
    ax = axes[0]
    stages = [("dense", "dense"), ("pruned", "pruned"), ("compressed", "compressed")]
    xs, ys, ticks = [], [], []
    for k, (key, title) in enumerate(stages):
        section = metrics.get(key) if isinstance(metrics.get(key), Mapping) else {}
        sub = "fp32" if key == "dense" else ""
        s = finite(section.get("sparsity"))
        if key != "dense" and s is not None:
            sub = f"s={100 * s:.4g} %"
        if key == "compressed" and _bits_text(section):
            sub += f"\n{_bits_text(section)}"
        ticks.append(f"{title}\n{sub}".rstrip())
        v = finite(section.get("metric"))
        if v is not None:
            xs.append(k)
            ys.append(v * scale)
    if ys:
        ax.plot(xs, ys, "-", color="0.7", lw=1, zorder=1)
        for x, y in zip(xs, ys):
            ax.scatter([x], [y], s=60, zorder=3, color=_STAGE_COLOURS[stages[x][0]], edgecolor="black")
            ax.annotate(format_metric(y / scale, metric_name), (x, y), xytext=(0, 8),
                        textcoords="offset points", ha="center", fontsize=9, fontweight="bold")
        if 0 in xs:
            ax.axhline(ys[xs.index(0)], color="tab:blue", ls="--", lw=0.8, alpha=0.6)
        lo, hi = min(ys), max(ys)
        pad = max(hi - lo, abs(hi) * 0.01, 1e-6)
        ax.set_ylim(lo - 0.6 * pad, hi + 0.9 * pad)
    else:
        ax.text(0.5, 0.5, "no metric values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks(range(3), ticks, fontsize=8)
    ax.set_xlim(-0.5, 2.5)
    ax.set_ylabel(_axis_label(metric_name, hib))
    ax.set_title(f"{metric_label(metric_name)} by stage", fontsize=10)
    ax.grid(axis="y", alpha=0.3)

    # --- fine-tuning history ------------------------------------------------------------------
    if n_panels > 1:
        hx = _history_x(history)
        segs = _stage_segments(history)
        panels: list[tuple[Axes, str]] = []
        col = 1
        if has_loss:
            panels.append((axes[col], "loss"))
            col += 1
        if has_hmetric:
            panels.append((axes[col], "metric"))
        for j, (pax, key) in enumerate(panels):
            seen: set[str] = set()
            # The metric panel draws test-split points (stage ends) and, dashed with hollow markers, the
            # validation metric logged every `eval_every` steps (never the test split mid-training).
            for sub in (key,) if key == "loss" else ("metric", "val_metric"):
                for stage, idx in segs:
                    pts = [(hx[i], finite(history[i].get(sub))) for i in idx]
                    pts = [(x, y) for x, y in pts if y is not None]
                    if not pts:
                        continue
                    if key == "metric":
                        pts = [(x, y * scale) for x, y in pts]
                    colour = _STAGE_COLOURS.get(stage, "0.3")
                    name = stage if sub != "val_metric" else f"{stage} (validation)"
                    pax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if sub == "val_metric" else "-",
                             marker="o" if len(pts) < 40 else None, ms=3, lw=1.2, color=colour,
                             mfc="white" if sub == "val_metric" else colour, label=None if name in seen else name)
                    seen.add(name)
            for stage, idx in segs[1:]:
                pax.axvline(hx[idx[0]], color="0.6", ls=":", lw=0.8)
            if key == "loss":
                losses = [y for h in history if (y := finite(h.get("loss"))) is not None]
                if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
                    pax.set_yscale("log")
                pax.set_ylabel("loss")
                pax.set_title("training / fine-tuning loss", fontsize=10)
            else:
                pax.set_ylabel(_axis_label(metric_name, hib))
                pax.set_title(f"{metric_label(metric_name)} during training / fine-tuning", fontsize=10)
            pax.set_xlabel("step (cumulative over stages)")
            pax.grid(alpha=0.3)
            handles, labels = pax.get_legend_handles_labels()
            if j == 0:  # sparsity once, on a twin axis of the first history panel
                sp = [(hx[i], s) for i, h in enumerate(history) if (s := finite(h.get("sparsity"))) is not None]
                if sp:
                    tw = pax.twinx()
                    tw.plot([p[0] for p in sp], [100 * p[1] for p in sp], "--", color="0.35", lw=1.2,
                            label="sparsity")
                    tw.set_ylim(0, 102)
                    tw.set_ylabel("sparsity (%)")
                    h2, l2 = tw.get_legend_handles_labels()
                    handles, labels = handles + h2, labels + l2
            if handles:
                pax.legend(handles, labels, fontsize=8, loc="best", framealpha=0.85)
    return _save(fig, path)


def plot_pareto(
    rows: Sequence[Mapping[str, Any]],
    x_key: str,
    y_key: str,
    path: str | Path,
    metric_name: str,
    higher_is_better: bool,
    label_key: str | None = None,
    references: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Scatter of ``y_key`` (the metric) against ``x_key`` (``bops`` or ``memory_bits``, log x) with the front.

    Each point is labelled by ``row[label_key]`` or, by default, :func:`run_label` (``"s=0.98 w4a8"``).
    The Pareto front (:func:`pareto_front`) is drawn as a step line -- the best metric reachable within
    each budget -- and its points are highlighted. ``references`` are extra points (e.g.
    ``{"label": "dense fp32", "bops": ..., "memory_bits": ..., "metric": ...}``) drawn as black stars,
    not part of the front. Points with a non-positive or missing x cannot sit on a log axis and are
    skipped. Returns ``path``.

    >>> import tempfile; from pathlib import Path
    >>> rows = [{"bops": 1e6, "metric": 0.9, "sparsity": 0.9, "weight_bits": 4, "act_bits": 8},
    ...         {"bops": 4e6, "metric": 0.95, "sparsity": 0.5, "weight_bits": 8, "act_bits": 8}]
    >>> p = plot_pareto(rows, "bops", "metric", Path(tempfile.mkdtemp()) / "p.png", "top1", True)
    >>> p.read_bytes()[:4]
    b'\\x89PNG'
    """
    scale = _metric_scale(metric_name)
    front = pareto_front(rows, x_key, y_key, higher_is_better)
    on_front = set(front)
    fig = _figure(7.6, 5.2)
    ax = fig.subplots()

    def xy(row: Mapping[str, Any]) -> tuple[float, float] | None:
        x, y = finite(row.get(x_key)), finite(row.get(y_key))
        if x is None or y is None or x <= 0:
            return None
        return x, y * scale

    plotted = 0
    others = [p for i, r in enumerate(rows) if i not in on_front and (p := xy(r)) is not None]
    if others:
        ax.scatter([p[0] for p in others], [p[1] for p in others], s=28, color="0.6", zorder=2,
                   label="runs")
        plotted += len(others)
    fpts = [p for i in front if (p := xy(rows[i])) is not None]
    if fpts:
        ax.step([p[0] for p in fpts], [p[1] for p in fpts], where="post", color="tab:red", lw=1.4,
                zorder=3, alpha=0.8)
        ax.scatter([p[0] for p in fpts], [p[1] for p in fpts], s=52, color="tab:red", edgecolor="black",
                   zorder=4, label=f"Pareto front ({len(fpts)})")
        plotted += len(fpts)
    for i, row in enumerate(rows):
        p = xy(row)
        if p is None:
            continue
        text = str(row.get(label_key, "")) if label_key is not None else run_label(row)
        if text:
            ax.annotate(text, p, xytext=(4, 4 if i % 2 == 0 else -9), textcoords="offset points",
                        fontsize=7, color="black" if i in on_front else "0.35")
    for k, ref in enumerate(references or []):
        p = xy(ref)
        if p is None:
            continue
        label = str(ref.get("label", "reference"))
        ax.scatter([p[0]], [p[1]], marker="*", s=200, color="black", zorder=5,
                   label=label if k < 6 else None)
        ax.annotate(label, p, xytext=(6, -12), textcoords="offset points", fontsize=8, fontweight="bold")
        plotted += 1

    if plotted:
        ax.set_xscale("log")
        ax.legend(fontsize=8, loc="lower right" if higher_is_better else "upper right", framealpha=0.85)
    else:
        _empty(ax, "no runs with finite values")
    ax.set_xlabel(f"{_X_LABELS.get(x_key, x_key)}, log scale  [← better]")
    ax.set_ylabel(_axis_label(metric_name, higher_is_better))
    ax.set_title(f"{metric_label(metric_name)} vs {_X_LABELS.get(x_key, x_key).split(' (')[0]}: "
                 f"Pareto front over {len(rows)} runs", fontsize=10)
    ax.grid(which="major", alpha=0.3)
    ax.grid(which="minor", alpha=0.1)
    return _save(fig, path)
