"""Markdown reports of a run directory and of a sweep (METHOD.md §4 measures, §5 run outputs).

``render_report(DIR)`` reads ``DIR/metrics.json`` (and ``DIR/recipe.yaml``) and writes ``DIR/report.md``
with ``DIR/plots/layers.png`` and ``DIR/plots/stages.png`` (a sweep's table, CSV and Pareto plots are
:mod:`prunq.report.sweep`'s; the Markdown cells are :mod:`prunq.report.markdown`'s). Everything is written atomically, and links are relative, so a report
rendered inside :class:`prunq.report.fsutil.atomic_dir`'s temporary directory stays valid after the rename.

This module imports neither torch nor matplotlib at import time, so ``prunq report`` starts fast.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from prunq.core.errors import PrunqError
from prunq.report.fsutil import atomic_write_text, inside_run
from prunq.report.markdown import (
    _DASH, _bit_cell, _bits, _duration, _int, _kib, _list, _pct3, _ratio, _sci, _section, _sparsity, _table,
)  # fmt: skip
from prunq.report.plots import (
    finite,
    format_metric,
    is_percent_metric,
    metric_label,
    plot_layers,
    plot_stages,
)

__all__ = ["REQUIRED_KEYS", "load_metrics", "render_report", "summary_line"]

#: The keys METHOD.md §5 guarantees in ``metrics.json``; ``"layers[]"`` lists those of each layer.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "": ("task", "metric_name", "higher_is_better", "dense", "pruned", "compressed",
         "memory_ratio", "bops_ratio", "layers"),
    "dense": ("metric", "params", "macs", "bops", "memory_bits"),
    "pruned": ("metric", "sparsity"),
    "compressed": ("metric", "sparsity", "weight_bits", "act_bits", "bops", "memory_bits"),
    "layers[]": ("name", "params", "nonzeros", "macs", "weight_bits", "act_bits"),
}




# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def _missing_keys(metrics: Mapping[str, Any]) -> list[str]:
    """Dotted names of the §5 keys absent from ``metrics`` (or of the wrong container type)."""
    missing = [k for k in REQUIRED_KEYS[""] if k not in metrics]
    for sec in ("dense", "pruned", "compressed"):
        if sec not in metrics:
            continue
        if not isinstance(metrics[sec], Mapping):
            missing.append(f"{sec} (not an object)")
            continue
        missing += [f"{sec}.{k}" for k in REQUIRED_KEYS[sec] if k not in metrics[sec]]
    layers = metrics.get("layers")
    if "layers" in metrics:
        if not isinstance(layers, list):
            missing.append("layers (not a list)")
        else:
            bad = [i for i, layer in enumerate(layers) if not isinstance(layer, Mapping)]
            if bad:
                missing.append(f"layers[{_indices(bad)}] (not objects)")
            for k in REQUIRED_KEYS["layers[]"]:
                idx = [i for i, layer in enumerate(layers) if isinstance(layer, Mapping) and k not in layer]
                if idx:
                    missing.append(f"layers[{_indices(idx)}].{k}")
    return missing


def _indices(idx: Sequence[int]) -> str:
    return ",".join(map(str, idx[:5])) + (f",… ({len(idx)} layers)" if len(idx) > 5 else "")


def load_metrics(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``run_dir/metrics.json``.

    Raises :class:`~prunq.core.errors.PrunqError` naming the file when it is missing, is not valid JSON, is
    not a JSON object, or lacks keys METHOD.md §5 requires (all missing ones are listed, dotted:
    ``dense.bops``, ``layers[0,3].macs``). Extra keys are kept; optional ones may be absent.
    """
    run_dir = Path(run_dir)
    path = inside_run(run_dir, "metrics.json")
    if not run_dir.is_dir():
        raise PrunqError(f"{run_dir}: no such run directory")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PrunqError(f"{path}: not found; is {run_dir} a prunq run directory?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PrunqError(f"{path}: cannot be read ({e})") from None
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as e:
        raise PrunqError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an integer of more than 4300 digits; deep nesting
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:120]
        raise PrunqError(f"{path}: not valid JSON ({reason})") from None
    if not isinstance(metrics, dict):
        raise PrunqError(f"{path}: expected a JSON object, got {type(metrics).__name__}")
    missing = _missing_keys(metrics)
    if missing:
        raise PrunqError(f"{path}: missing required keys (METHOD.md §5): {', '.join(missing)}")
    return metrics


def _load_recipe_text(run_dir: Path) -> str | None:
    path = inside_run(run_dir, "recipe.yaml")
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PrunqError(f"{path}: not valid YAML ({e})") from None
    return text


# --------------------------------------------------------------------------------------------------
# the run report
# --------------------------------------------------------------------------------------------------


def summary_line(metrics: Mapping[str, Any]) -> str:
    """One line: ``"98.0 % sparse, w4a8: top-1 97.8 % (dense 98.1 %), memory ×0.012, BOPs ×0.0006"``.

    >>> summary_line({"metric_name": "top1", "dense": {"metric": 0.981},
    ...               "compressed": {"metric": 0.978, "sparsity": 0.98, "weight_bits": 4, "act_bits": 8},
    ...               "memory_ratio": 0.012, "bops_ratio": 0.0006})
    '98.0 % sparse, w4a8: top-1 97.8 % (dense 98.1 %), memory ×0.012, BOPs ×0.0006'
    """
    name = str(metrics.get("metric_name", "metric"))
    c, d = _section(metrics, "compressed"), _section(metrics, "dense")
    return (f"{_sparsity(c.get('sparsity'))} sparse, {_bits(c)}: "
            f"{metric_label(name)} {format_metric(c.get('metric'), name)} "
            f"(dense {format_metric(d.get('metric'), name)}), "
            f"memory ×{_ratio(metrics.get('memory_ratio'))}, BOPs ×{_ratio(metrics.get('bops_ratio'))}")


def _div(a: Any, b: Any) -> float | None:
    fa, fb = finite(a), finite(b)
    if fa is None or fb is None or fb == 0:
        return None
    return fa / fb


def _files(metrics: Mapping[str, Any]) -> str | None:
    """Real files beside the cost model's figure (``metrics["files"]``): what the savings weigh on disk."""
    files = metrics.get("files")
    if not isinstance(files, Mapping):
        return None
    dense = finite(files.get("dense_fp32_bytes"))
    rows = []
    for key, label in (("dense_fp32_bytes", "dense model, fp32 safetensors"), ("packed_bytes", "`model.packed`"),
                       ("cost_model_bytes", "cost model (`memory_bits` / 8; a figure, not a file)")):  # fmt: skip
        v = finite(files.get(key))
        if v is None:
            continue
        share = f"{100 * v / dense:.3g} %" if dense else _DASH
        rows.append([label, _int(round(v)), share])
    if not rows:
        return None
    lines = ["## Files", "", _table(["", "bytes", "of dense"], rows, "lrr")]
    packed, cost = finite(files.get("packed_bytes")), finite(files.get("cost_model_bytes"))
    if packed and cost:
        lines += ["", f"The packed file is {packed / cost:.3f}× the cost model's figure (a 9-byte header per "
                      "layer, the model's origin, the safetensors header); `prunq.load` reads it back bit for bit."]  # fmt: skip
    if isinstance(files.get("packed_error"), str):
        lines += ["", f"No packed file: {files['packed_error'][:300]}"]
    return "\n".join(lines)


def _act_products(metrics: Mapping[str, Any]) -> str | None:
    """BOPs split into weight and activation products, and the activation-product sites (correlation
    volumes, attention, soft-argmin) of the compressed model."""
    c = _section(metrics, "compressed")
    wb, ab = finite(c.get("weight_bops")), finite(c.get("act_bops"))
    sites = [s for s in _list(metrics.get("act_sites")) if isinstance(s, Mapping)]
    if wb is None or ab is None or (ab == 0 and not sites):
        return None
    total = wb + ab
    lines = ["## Bit-operations: weights and activations", "",
             f"Compressed BOPs {total:.3g} = weight × activation {wb:.3g} + activation × activation {ab:.3g} "
             f"({100 * ab / total:.1f} %)." if total else "No bit-operations."]  # fmt: skip
    rows = []
    for s in sites[:30]:
        bits = s.get("bits")
        bits_txt = "×".join(str(b) for b in bits) if isinstance(bits, (list, tuple)) else _DASH
        macs, bops = finite(s.get("macs")), finite(s.get("bops"))
        rows.append([f"`{str(s.get('name'))[:80]}`", str(s.get("kind", _DASH))[:20], bits_txt,
                     _int(macs) if macs is not None else _DASH, f"{bops:.3g}" if bops is not None else _DASH])  # fmt: skip
    if rows:
        lines += ["", _table(["site", "kind", "bits", "MACs / example", "BOPs"], rows, "lllrr")]
    return "\n".join(lines)


def _headline(metrics: Mapping[str, Any]) -> str:
    name = str(metrics.get("metric_name", "metric"))
    d, p, c = (_section(metrics, k) for k in ("dense", "pruned", "compressed"))
    fp32_bops, fp32_mem = d.get("bops"), d.get("memory_bits")
    # The int8 reference (dense, 8-bit weights and activations) is implied by the stored int8 ratios.
    int8_bops = _div(c.get("bops"), metrics.get("bops_ratio_int8"))
    int8_mem = _div(c.get("memory_bits"), metrics.get("memory_ratio_int8"))

    layer_bits = {(_bit_cell(layer.get("weight_bits")), _bit_cell(layer.get("act_bits")))
                  for layer in _list(metrics.get("layers")) if isinstance(layer, Mapping)}
    mixed = len(layer_bits) > 1
    rows = [
        ["dense", format_metric(d.get("metric"), name), _sparsity(0.0), "w32a32",
         _sci(fp32_bops), _kib(fp32_mem), _ratio(1.0), _ratio(1.0),
         _ratio(_div(fp32_bops, int8_bops)), _ratio(_div(fp32_mem, int8_mem))],
        ["pruned", format_metric(p.get("metric"), name), _sparsity(p.get("sparsity")), "w32a32",
         _sci(p.get("bops")), _kib(p.get("memory_bits")),
         _ratio(_div(p.get("bops"), fp32_bops)), _ratio(_div(p.get("memory_bits"), fp32_mem)),
         _ratio(_div(p.get("bops"), int8_bops)), _ratio(_div(p.get("memory_bits"), int8_mem))],
        ["**compressed**", f"**{format_metric(c.get('metric'), name)}**", _sparsity(c.get("sparsity")),
         _bits(c) + (" *" if mixed else ""), _sci(c.get("bops")), _kib(c.get("memory_bits")),
         _ratio(metrics.get("bops_ratio")), _ratio(metrics.get("memory_ratio")),
         _ratio(metrics.get("bops_ratio_int8")), _ratio(metrics.get("memory_ratio_int8"))],
    ]
    headers = ["stage", metric_label(name), "sparsity", "bits", "BOPs", "memory (KiB)",
               "BOPs × fp32", "memory × fp32", "BOPs × int8", "memory × int8"]
    out = [_table(headers, rows, "lrrl" + "r" * 6), ""]
    notes = ["Ratios divide by a dense reference (METHOD.md §4): *fp32* = 32-bit weights and "
             "activations; *int8* = 8-bit weights and activations, no pruning — so a precision change "
             "is not mistaken for pruning."]
    if int8_bops is not None or int8_mem is not None:
        notes.append(f"int8 reference: {_sci(int8_bops)} BOPs, {_kib(int8_mem)} KiB.")
    if mixed:
        notes.append("\\* most common bit-widths; the per-layer table below gives each layer's.")
    out.append(" ".join(notes))
    return "\n".join(out)


def _encodings(metrics: Mapping[str, Any]) -> str | None:
    by_enc = metrics.get("memory_bits_by_encoding")
    bound = finite(metrics.get("entropy_bound_bits"))
    if not isinstance(by_enc, Mapping) and bound is None:
        return None
    fp32_mem = _section(metrics, "dense").get("memory_bits")
    out = ["## Memory by index encoding", ""]
    if isinstance(by_enc, Mapping) and by_enc:
        rows = []
        for enc, bits in by_enc.items():
            label = "**best** (smallest per layer)" if enc == "best" else str(enc)
            rows.append([label, _kib(bits), _int(bits), _ratio(_div(bits, fp32_mem))])
        out += ["Whole-model memory (non-zero values + indices + scales + biases + uncompressed "
                "parameters) with every layer's positions stored in one encoding:", "",
                _table(["encoding", "memory (KiB)", "memory (bits)", "× dense fp32"], rows,
                       "lrrr"), ""]
    if bound is not None:
        line = (f"Entropy bound on the position (index) bits, Σ N·H(ρ) over layers: "
                f"**{_int(bound)} bits** ({_kib(bound)} KiB).")
        chosen = _chosen_index_bits(_list(metrics.get("layers")))
        if chosen is not None and bound > 0:
            line += f" The chosen encodings spend {_int(chosen)} index bits, ×{_ratio(chosen / bound)} the bound."
        out += [line, ""]
    layer_rows = _index_rows(_list(metrics.get("layers")))
    if layer_rows:
        out += ["Index bits per layer:", "", layer_rows, ""]
    return "\n".join(out).rstrip()


def _chosen_index_bits(layers: Sequence[Any]) -> float | None:
    total = 0.0
    for layer in layers:
        if not isinstance(layer, Mapping):
            return None
        ib, enc = layer.get("index_bits"), layer.get("encoding")
        v = finite(ib.get(enc)) if isinstance(ib, Mapping) and isinstance(enc, str) else None
        if v is None:
            return None
        total += v
    return total if layers else None


def _index_rows(layers: Sequence[Any]) -> str | None:
    recs = [layer for layer in layers if isinstance(layer, Mapping)]
    if not any(isinstance(layer.get("index_bits"), Mapping) for layer in recs):
        return None
    encs: list[str] = []
    for layer in recs:
        ib = layer.get("index_bits")
        for enc in ib if isinstance(ib, Mapping) else {}:
            if enc not in encs:
                encs.append(str(enc))
    rows = []
    for layer in recs:
        ib = layer.get("index_bits") if isinstance(layer.get("index_bits"), Mapping) else {}
        chosen = layer.get("encoding") if isinstance(layer.get("encoding"), str) else None
        cells = [f"**{_int(ib.get(e))}**" if e == chosen and e in ib else _int(ib.get(e)) for e in encs]
        rows.append([layer.get("name", "?"), *cells, _int(layer.get("entropy_bits")), chosen or _DASH])
    return _table(["layer", *encs, "entropy bound", "chosen"], rows,
                  "l" + "r" * (len(encs) + 1) + "l")


def _layers_table(layers: Sequence[Any]) -> str:
    recs = [layer for layer in layers if isinstance(layer, Mapping)]
    if not recs:
        return "_No compressed layers._"
    rows = []
    for layer in recs:
        density = finite(layer.get("density"))
        if density is None:
            density = _div(layer.get("nonzeros"), layer.get("params"))
        rows.append([f"`{layer.get('name', '?')}`", layer.get("kind") or _DASH, _int(layer.get("params")),
                     _int(layer.get("nonzeros")), _pct3(density),
                     _bit_cell(layer.get("weight_bits")), _bit_cell(layer.get("act_bits")),
                     _int(layer.get("macs")), _sci(layer.get("bops")), _int(layer.get("memory_bits")),
                     layer.get("encoding") if isinstance(layer.get("encoding"), str) else _DASH])

    def total(key: str) -> float | None:
        vals = [finite(layer.get(key)) for layer in recs]
        return None if any(v is None for v in vals) else sum(vals)  # type: ignore[arg-type]

    n, nz = total("params"), total("nonzeros")
    rows.append(["**total**", "", _int(n), _int(nz), _pct3(_div(nz, n)), "", "",
                 _int(total("macs")), _sci(total("bops")), _int(total("memory_bits")), ""])
    headers = ["layer", "kind", "params", "non-zeros", "density", "w bits", "a bits", "MACs", "BOPs",
               "memory (bits)", "encoding"]
    return _table(headers, rows, "ll" + "r" * 8 + "l")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _format_extra(key: str, v: Any) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if finite(v) is not None:
        # Known metrics (middlebury.epe, middlebury.d1...) get their units; anything else 4 digits.
        known = is_percent_metric(leaf) or leaf.lower() == "epe"
        return format_metric(v, leaf) if known else f"{float(v):.4g}"
    return _DASH if v is None else str(v)


# The METHOD.md §5 keys of each stage section; anything else there is one of the task's other metrics.
_STAGE_KEYS = frozenset({"metric", "params", "macs", "bops", "memory_bits", "sparsity", "weight_bits", "act_bits"})


def _extra(metrics: Mapping[str, Any]) -> str | None:
    stages = [s for s in ("dense", "pruned", "compressed") if isinstance(metrics.get(s), Mapping)]
    flat = {s: flatten({k: v for k, v in metrics[s].items() if k not in _STAGE_KEYS}) for s in stages}
    keys: list[str] = []
    for s in stages:
        keys += [k for k in flat[s] if k not in keys]
    if not keys:
        return None
    rows = [[f"`{k}`", *(_format_extra(k, flat[s][k]) if k in flat[s] else _DASH for s in stages)]
            for k in keys]
    return "\n".join(["## Other metrics", "", _table(["metric", *stages], rows,
                                                       "l" + "r" * len(stages))])


def _read_timing(run_dir: Path, metrics: Mapping[str, Any]) -> Any:
    """``timing.json`` (older runs kept the timings in ``metrics.json``); unreadable means none."""
    path = inside_run(run_dir, "timing.json")
    if not path.is_file():
        return metrics.get("timing")
    try:
        return json.loads(path.read_bytes()[: 1 << 20])
    except (ValueError, RecursionError):
        return None


def _timing(timing: Any) -> str | None:
    if not isinstance(timing, Mapping) or not timing:
        return None
    names = {"dense_s": "dense training", "prune_s": "pruning + fine-tuning",
             "quant_s": "quantization-aware fine-tuning", "total_s": "**total**"}
    order = [k for k in names if k in timing and k != "total_s"]
    order += [k for k in timing if k not in names] + (["total_s"] if "total_s" in timing else [])
    rows = [[names.get(k, k.removesuffix("_s")), _duration(timing[k])] for k in order]
    return "\n".join(["## Timing", "", _table(["stage", "wall time"], rows, "lr")])


def _previews(run_dir: Path, task: str) -> str | None:
    """The task's pictures of the dense and compressed models' outputs (``previews.safetensors``)."""
    from prunq.pipeline.io import PREVIEWS_FILE, load_state
    from prunq.tasks import render_previews

    path = inside_run(run_dir, PREVIEWS_FILE)
    if not path.is_file():
        return None
    figures = render_previews(task, load_state(path), inside_run(run_dir, "plots"))
    if not figures:
        return None
    (caption, main), *panels = figures
    lines = ["## Predictions", "", f"![{caption}](plots/{main})", ""]
    if panels:
        lines.append("Each panel on its own: " + " · ".join(f"[{c}](plots/{n})" for c, n in panels))
    return "\n".join(lines)


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.md``, ``plots/layers.png`` and ``plots/stages.png`` into ``run_dir``; return report.md.

    Reads ``metrics.json`` (checked by :func:`load_metrics`) and ``recipe.yaml`` if present. Optional
    sections (encodings, extra metrics, timing, history) appear only when their keys do.

    Example (shell): ``prunq report runs/digits-s98-w4a8`` then open ``runs/digits-s98-w4a8/report.md``.
    """
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    recipe_text = _load_recipe_text(run_dir)
    layers = [layer for layer in metrics["layers"] if isinstance(layer, Mapping)]
    plot_layers(layers, inside_run(run_dir, "plots", "layers.png"))
    plot_stages(metrics, inside_run(run_dir, "plots", "stages.png"))

    name = str(metrics.get("metric_name"))
    hib = bool(metrics.get("higher_is_better"))
    meta = [f"metric: {metric_label(name)} ({'higher' if hib else 'lower'} is better)",
            f"{len(layers)} compressed layers"]
    params = finite(_section(metrics, "dense").get("params"))
    if params is not None:
        meta.append(f"{_int(params)} parameters")
    if metrics.get("prunq_version"):
        meta.append(f"prunq {metrics['prunq_version']}")

    parts = [f"# prunq report: {metrics.get('task')}", "", f"**{summary_line(metrics)}**", "",
             " · ".join(meta), "", "## Headline", "", _headline(metrics), ""]
    for block in (_files(metrics), _act_products(metrics)):
        if block:
            parts += [block, ""]
    parts += ["## Layers", "", _layers_table(metrics["layers"]), "",
              "![Per-layer density and bit-widths](plots/layers.png)", ""]
    encodings = _encodings(metrics)
    if encodings:
        parts += [encodings, ""]
    parts += ["## Stages", "", "![Metric by stage and fine-tuning curves](plots/stages.png)", ""]
    pictures = _previews(run_dir, str(metrics.get("task")))
    if pictures:
        parts += [pictures, ""]
    for block in (_extra(metrics), _timing(_read_timing(run_dir, metrics))):
        if block:
            parts += [block, ""]
    if recipe_text is not None:
        fence = _fence(recipe_text)
        parts += ["## Recipe", "", "The resolved recipe (`recipe.yaml`):", "", f"{fence}yaml",
                  recipe_text.rstrip("\n"), fence, ""]
    return atomic_write_text(inside_run(run_dir, "report.md"), "\n".join(parts))


# --------------------------------------------------------------------------------------------------
# sweeps
# --------------------------------------------------------------------------------------------------
