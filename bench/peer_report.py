"""The analysis and the outputs of bench/peers.py: joins of part results and seeds, Pareto dominance, the joint
study, the markdown tables, the plot and the README section. Pure functions of the result documents (no
training), so they are unit-tested (tests/bench/test_peers.py) and rerun by ``peers.py --combine``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TOOLS = {
    "prunq": "tab:red", "torch.nn.utils.prune + QAT": "tab:blue", "NNCF": "tab:green",
    "Torch-Pruning + QAT": "tab:purple", "Brevitas": "tab:orange",
}  # fmt: skip

#: What each tool does itself and what the benchmark had to add (shown beside its rows).
NOTES = {
    "prunq": "prunes and quantizes",
    "torch.nn.utils.prune + QAT": "prunes only; the QAT is plain torch fake-quant",
    "NNCF": "8-bit only: nncf.quantize has no bit-width",
    "Torch-Pruning + QAT": "removes channels only; the QAT is plain torch fake-quant",
    "Brevitas": "quantizes only; the masks come from torch.nn.utils.prune",
}


# ---------------------------------------------------------------------------------------------- analysis
def dominance(rows: list[dict], higher: bool) -> list[dict]:
    """For every peer point: the best prunq point within its BOPs, and whether that one is at least as good.

    prunq Pareto-dominates a peer point when some prunq point has BOPs <= the peer's and a metric at least
    as good. ``gap`` = prunq's best metric within the peer's BOPs minus the peer's (positive = prunq better,
    in the metric's direction); ``None`` when prunq has no point that cheap.
    """
    ours = [r for r in rows if r["tool"] == "prunq"]
    out = []
    for p in rows:
        if p["tool"] == "prunq":
            continue
        best = _best([q for q in ours if q["bops_ratio"] <= p["bops_ratio"]], higher)
        gap = None if best is None else (best["metric"] - p["metric"]) * (1 if higher else -1)
        out.append({"tool": p["tool"], "sparsity": p["sparsity"], "bits": f"w{p['weight_bits']}a{p['act_bits']}",
                    "metric": p["metric"], "bops_ratio": p["bops_ratio"], "dominated": best is not None and gap >= 0,
                    "prunq_point": None if best is None else label(best),
                    "prunq_metric": None if best is None else best["metric"], "gap": gap})  # fmt: skip
    return out


def label(r: dict) -> str:
    return f"s{r['sparsity']:g} w{r['weight_bits']}a{r['act_bits']}"


def _best(rows: list[dict], higher: bool) -> dict | None:
    """The best metric; among equals, the cheapest in BOPs."""
    if not rows:
        return None
    return max(rows, key=lambda r: ((r["metric"] if higher else -r["metric"]), -r["bops_ratio"]))


def joint_study(rows: list[dict], higher: bool, budgets: list[float]) -> list[dict]:
    """At each BOPs budget, the best prunq grid point among (a) 8-bit pruning only, (b) 0 % sparsity
    quantization only, (c) every (sparsity, bits) pair."""
    grid = [r for r in rows if r["tool"] == "prunq"]
    families = {
        "pruning_only_8bit": lambda r: (r["weight_bits"], r["act_bits"]) == (8, 8),
        "quant_only_dense": lambda r: r["sparsity"] == 0,
        "joint": lambda r: True,
    }
    out = []
    for b in budgets:
        entry: dict[str, Any] = {"budget": b}
        for fam, keep in families.items():
            best = _best([r for r in grid if keep(r) and r["bops_ratio"] <= b], higher)
            entry[fam] = None if best is None else {"point": label(best), "metric": best["metric"],
                                                    "bops_ratio": best["bops_ratio"]}  # fmt: skip
        alone = [entry[f]["metric"] for f in ("pruning_only_8bit", "quant_only_dense") if entry[f]]
        j = entry["joint"]
        entry["joint_gain"] = None if not (j and alone) else (j["metric"] - (max if higher else min)(alone)) * (
            1 if higher else -1)
        out.append(entry)
    return out


def combine(parts: list[dict]) -> dict:
    first = parts[0]
    for p in parts[1:]:
        if p["dense"]["metric"] != first["dense"]["metric"] or p["recipe_resolved"] != first["recipe_resolved"]:
            raise SystemExit("--combine: the parts come from different dense models or recipes")
    evidence = []
    for e in (e for p in parts for e in p["evidence"]):
        if e not in evidence:  # the same API fact from every seed's process
            evidence.append(e)
    wall: dict[str, float] = {}
    for p in parts:
        for k, v in p["wall_s"].items():
            seed = p.get("seeds", [0])[0]
            if len({q.get("seeds", [0])[0] for q in parts}) > 1:
                k = f"seed {seed}" if k == "all" else f"{k}, seed {seed}"
            wall[k] = v
    return {**first, "rows": [r for p in parts for r in p["rows"]], "evidence": evidence,
            "seeds": sorted({s for p in parts for s in p.get("seeds", [0])}),
            "commands": [c for p in parts for c in p["commands"]], "wall_s": wall}  # fmt: skip


_MEAN_KEYS = ("metric", "achieved_sparsity", "bops_ratio", "memory_ratio", "bops", "memory_bits", "pruned_metric")


def mean_over_seeds(rows: list[dict]) -> list[dict]:
    """One row per (tool, sparsity, bits): the first seed's row with the headline numbers replaced by their
    means over seeds, the per-seed metrics in ``metric_seeds`` and their count in ``n_seeds``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["tool"], r["sparsity"], r["weight_bits"], r["act_bits"]), []).append(r)
    out = []
    for g in groups.values():
        row = dict(g[0])
        for k in _MEAN_KEYS + tuple(k for k in g[0] if k.startswith(("middlebury.", "val."))):
            vals = [r[k] for r in g if isinstance(r.get(k), (int, float))]
            if len(vals) == len(g):
                row[k] = sum(vals) / len(vals)
        row["metric_seeds"] = [r["metric"] for r in g]
        row["n_seeds"] = len(g)
        row.pop("seed", None)
        out.append(row)
    return out


def analyse(res: dict) -> dict:
    hi = res["higher_is_better"]
    if len(res.get("seeds", [0])) > 1:
        res["rows_per_seed"] = res["rows"]
        res["rows"] = mean_over_seeds(res["rows"])
    res["dominance"] = dominance(res["rows"], hi)
    if any("middlebury.epe" in r for r in res["rows"]):  # stereo: the real pair, as a second verdict
        real = [{**r, "metric": r["middlebury.epe"]} for r in res["rows"] if "middlebury.epe" in r]
        res["dominance_middlebury"] = dominance(real, False)
    res["joint"] = joint_study(res["rows"], hi, res["config"]["budgets"])
    return res


# ---------------------------------------------------------------------------------------------- output
def fmt_metric(res: dict, v: float | None) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.1f} %" if res["metric_name"] == "top1" else f"{v:.3f}"


def _metric_title(res: dict) -> str:
    return "top-1" if res["metric_name"] == "top1" else "val EPE (px)"


def _verdict(res: dict, x: dict | None, fmt=None) -> str:
    fmt = fmt or (lambda v: fmt_metric(res, v))
    if x is None:
        return ""
    if x["prunq_point"] is None:
        return "✗ no prunq point that cheap"
    return f"{'✓' if x['dominated'] else '✗'} {x['prunq_point']}: {fmt(x['prunq_metric'])}"


def _with_seeds(res: dict, r: dict) -> str:
    """The metric, with the range over seeds when there are several."""
    text = fmt_metric(res, r["metric"])
    if r.get("n_seeds", 1) > 1:
        text += f" ({fmt_metric(res, min(r['metric_seeds']))}–{fmt_metric(res, max(r['metric_seeds']))})"
    return text


def tool_table(res: dict) -> list[str]:
    """prunq at the peers' settings and every peer point, with the dominance verdicts."""
    stereo = "dominance_middlebury" in res
    head = (f"| tool | target | sparsity | bits | {_metric_title(res)} | prunq at <= its BOPs |"
            + (" Middlebury EPE | prunq at <= its BOPs (Middlebury) |" if stereo else "")
            + " memory x fp32 | BOPs x fp32 | the tool itself |")  # fmt: skip
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    d = res["dense"]
    lines.append(f"| dense fp32 | — | 0 % | w32a32 | {fmt_metric(res, d['metric'])} | |"
                 + (f" {d['middlebury.epe']:.3f} | |" if stereo else "") + " 1 | 1 | |")  # fmt: skip
    key = lambda x: (x["tool"], x["sparsity"], x["bits"])  # noqa: E731
    dom = {key(x): x for x in res["dominance"]}
    dom_m = {key(x): x for x in res.get("dominance_middlebury", [])}
    for r in res["rows"]:
        if r["tool"] == "prunq" and (r["sparsity"] not in res["config"]["sparsity"]
                                     or (r["weight_bits"], r["act_bits"]) != tuple(res["config"]["bits"])):
            continue
        bits = f"w{r['weight_bits']}a{r['act_bits']}"
        k = (r["tool"], r["sparsity"], bits)
        target = f"prunq s{r['sparsity']:g}'s BOPs" if r["tool"].startswith("Torch-Pruning") else f"{r['sparsity']:g}"
        lines.append(
            f"| {r['tool']} | {target} | {100 * r['achieved_sparsity']:.1f} % | {bits} | {_with_seeds(res, r)} | "
            f"{_verdict(res, dom.get(k))} |"
            + (f" {r['middlebury.epe']:.3f} | {_verdict(res, dom_m.get(k), lambda v: f'{v:.3f}')} |" if stereo else "")
            + f" {r['memory_ratio']:.5f} | {r['bops_ratio']:.6f} | {NOTES.get(r['tool'], '')} |"
        )  # fmt: skip
    return lines


def dominance_summary(res: dict) -> list[str]:
    """How many peer points prunq dominates, and where it does not, by how much."""
    out = []
    verdicts = [("", res["dominance"], lambda v: fmt_metric(res, v))]
    if "dominance_middlebury" in res:
        verdicts = [(" on validation EPE", res["dominance"], lambda v: f"{v:.3f} px"),
                    (" on Middlebury EPE", res["dominance_middlebury"], lambda v: f"{v:.3f} px")]
    for what, dom, fmt in verdicts:
        misses = [x for x in dom if not x["dominated"]]
        line = f"prunq Pareto-dominates **{len(dom) - len(misses)} of {len(dom)}** peer points{what}"
        if misses:
            parts = []
            for x in misses:
                if x["prunq_point"] is None:
                    parts.append(f"{x['tool']} s={x['sparsity']:g} {x['bits']} (BOPs {x['bops_ratio']:.6f}: prunq has no "
                                 "point that cheap)")  # fmt: skip
                else:
                    gap = -x["gap"] * (100 if res["metric_name"] == "top1" else 1)
                    unit = " pt" if res["metric_name"] == "top1" else " px"
                    parts.append(f"{x['tool']} s={x['sparsity']:g} {x['bits']} ({fmt(x['metric'])} vs prunq's "
                                 f"{x['prunq_point']} {fmt(x['prunq_metric'])}: {gap:.{1 if unit == ' pt' else 3}f}{unit} "
                                 "better at no more BOPs)")  # fmt: skip
            line += "; not: " + "; ".join(parts)
        out.append(line + ".")
    return out


def joint_table(res: dict) -> list[str]:
    lines = ["| BOPs budget (x fp32) | (a) pruning alone, w8a8 | (b) quantization alone, 0 % | (c) best joint pair | "
             "(c) vs best of (a), (b) |", "|---|---|---|---|---:|"]  # fmt: skip

    def cell(e):
        return "not reachable in the grid" if e is None else f"{e['point']}: {fmt_metric(res, e['metric'])}"

    def gain_text(g: float | None) -> str:
        if g is None:
            return "—"
        if abs(g) < 1e-12:
            return "tie"
        if res["metric_name"] == "top1":
            return f"{100 * g:+.1f} pt"
        return f"{g:.3f} px better" if g > 0 else f"{-g:.3f} px worse"

    for j in res["joint"]:
        gain = gain_text(j["joint_gain"])
        lines.append(f"| 1/{round(1 / j['budget'])} | {cell(j['pruning_only_8bit'])} | {cell(j['quant_only_dense'])} | "
                     f"{cell(j['joint'])} | {gain} |")  # fmt: skip
    return lines


def evidence_lines(res: dict) -> list[str]:
    """The peers' limits: API facts and failures as recorded, then what was measured after each tool's steps."""
    out = [f"- **{e['tool']}** — {e['what']}: `{e['evidence']}`" for e in res["evidence"] if e["what"] != "version"]
    rows = res.get("rows_per_seed", res["rows"])

    def pct(v: float) -> str:
        return f"{100 * v:.2f} %"

    nncf = [r for r in rows if r["tool"] == "NNCF" and "sparsity_after_prune" in r]
    if nncf:
        steps = "; ".join(f"{pct(r['sparsity_after_prune'])} → {pct(r['sparsity_after_quantize'])} → "
                          f"{pct(r['achieved_sparsity'])}" for r in nncf)  # fmt: skip
        bits = sorted({b for r in nncf for b in r["nncf_weight_bits"]}), sorted({b for r in nncf for b in r["nncf_act_bits"]})
        out.append(f"- **NNCF** keeps its sparsity through its quantization (measured after nncf.prune → nncf.quantize → "
                   f"its QAT: {steps}); every quantizer it inserts is 8-bit (weights {bits[0]}, activations {bits[1]})")
    brev = [r for r in rows if r["tool"] == "Brevitas"]
    if brev:
        out.append("- **Brevitas** has no pruning; with torch.nn.utils.prune's masks re-attached to its layers, the "
                   "sparsity of `quant_weight()` after its QAT: " + "; ".join(
                       f"{pct(r['achieved_sparsity'])} (target {r['sparsity']:g})" for r in brev))  # fmt: skip
    collapsed = sorted({r["sparsity"] for r in rows if r["tool"] == "torch.nn.utils.prune + QAT"
                        and r.get("min_layer_density") == 0})  # fmt: skip
    if collapsed:
        out.append(f"- **torch.nn.utils.prune**: global L1 has no per-layer floor — at sparsity {collapsed} a layer was "
                   "pruned to nothing (density 0)")
    for r in rows:
        if r["tool"] == "Torch-Pruning + QAT" and r.get("mac_fraction", 0) > 1.001 * r.get("mac_target", 1):
            out.append(f"- **Torch-Pruning** at prunq s={r['sparsity']:g}'s BOPs: could not get there — at ratio "
                       f"{r['tp_ratio']:.2f} {100 * r['mac_fraction']:.1f} % of the MACs remain, target "
                       f"{100 * r['mac_target']:.1f} % (it leaves a layer whole rather than remove all its channels)")
    return list(dict.fromkeys(out))


def _method_section(rr: dict, key: str, kind: str) -> dict:
    """A resolved recipe's method config: ``methods: [...]`` (by ``kind``), or the ``prune:``/``quant:``
    sections of results written before recipes took a method list."""
    if key in rr:
        return rr[key]
    return next(m for m in rr["methods"] if m.get("kind") == kind)


def summarize(res: dict) -> str:
    rr = res["recipe_resolved"]
    rp, rq = _method_section(rr, "prune", "prune"), _method_section(rr, "quant", "quantize")
    d = res["dense"]
    pts = sum(1 for r in res["rows"] if r["tool"] == "prunq")
    lines = [
        f"# prunq vs peers: {res['task']}", "",
        *[f"`python bench/peers.py {' '.join(a)}`" for a in res["commands"]], "",
        f"One dense model ({d['params']:,} parameters, {d['source']}), then every tool gets the same budget: "
        f"{rp['finetune']['steps']} pruning fine-tuning steps and {rq['finetune']['steps']} "
        f"quantization steps ({rp['finetune']['optimizer']}, the task recipe's learning rates and batches"
        + (f"; every point run with {len(res['seeds'])} fine-tuning seeds, their mean shown with the range in "
           "brackets" if len(res.get("seeds", [0])) > 1 else "; one fine-tuning seed") + "). "
        "Sparsity, memory and BOPs are prunq's cost model on each tool's effective weights (sparsity against the "
        f"dense model's prunable weights, so removed channels count). prunq: {pts} grid points "
        f"(sparsity {res['config']['grid_sparsity']} x bits {[f'w{a}a{b}' for a, b in res['config']['grid_bits']]}); "
        "its rows at the peers' settings are listed, all are in the plot and the dominance check.", "",
        *dominance_summary(res), "",
        *tool_table(res), "",
        "**prunq at <= its BOPs**: the best prunq grid point whose BOPs do not exceed the peer's, and whether it is "
        "at least as good (✓: the peer point is Pareto-dominated).", "",
        "## The joint study", "",
        "The best prunq grid point within each BOPs budget, from three families: (a) pruning alone at w8a8 (any "
        "sparsity), (b) quantization alone (0 % sparsity, any bits), (c) any (sparsity, bits) pair.", "",
        *joint_table(res), "",
        "## What the peers cannot do, with the evidence", "",
        *evidence_lines(res), "",
        f"![metric vs BOPs](peers_{res['task']}_pareto.png)", "",
        "Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in res["wall_s"].items())
        + f" ({res['machine']['threads']} thread(s) each, {res['machine']['platform']}, torch {res['machine']['torch']}).",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prunq.report.plots import pareto_front

    stereo = res["task"] == "stereo"
    keys = [("metric", "synthetic validation EPE (px)"), ("middlebury.epe", "Middlebury EPE (px)")] if stereo \
        else [("metric", "top-1 (%)")]
    scale = 1 if stereo else 100
    fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 4.6), squeeze=False)
    hi = res["higher_is_better"]
    for ax, (key, title) in zip(axes[0], keys):
        ours = [r for r in res["rows"] if r["tool"] == "prunq"]
        front = [ours[i] for i in pareto_front(ours, "bops_ratio", key, hi)]
        ax.scatter([r["bops_ratio"] for r in ours], [scale * r[key] for r in ours], s=18, color=TOOLS["prunq"],
                   alpha=0.35, label="prunq grid")  # fmt: skip
        ax.step([r["bops_ratio"] for r in front], [scale * r[key] for r in front], where="post", color=TOOLS["prunq"],
                lw=1.4, label="prunq Pareto front")  # fmt: skip
        for tool, colour in TOOLS.items():
            if tool == "prunq":
                continue
            sel = [r for r in res["rows"] if r["tool"] == tool and r.get(key) is not None]
            if sel:
                ax.scatter([r["bops_ratio"] for r in sel], [scale * r[key] for r in sel], s=46, marker="D",
                           color=colour, edgecolor="black", label=tool, zorder=4)  # fmt: skip
                for r in sel:
                    ax.annotate(f"{r['sparsity']:g}", (r["bops_ratio"], scale * r[key]), xytext=(4, 3),
                                textcoords="offset points", fontsize=7)  # fmt: skip
        d = res["dense"]
        ax.scatter([1.0], [scale * d[key]], marker="*", s=150, color="black", label="dense fp32", zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel("BOPs x dense fp32 (log)  [← cheaper]")
        ax.set_ylabel(title + ("  [↓ better]" if not hi else "  [↑ better]"))
        ax.grid(True, which="both", alpha=0.3)
        if stereo:
            lo = min(scale * r[key] for r in res["rows"])
            ax.set_ylim(lo * 0.95, min(max(scale * r[key] for r in res["rows"]), lo * 3))
        else:
            ax.set_ylim(max(0, min(scale * r[key] for r in res["rows"]) - 2), 100.5)
    axes[0][0].legend(fontsize=7, loc="lower right" if hi else "upper right")
    fig.suptitle(f"{res['task']}: every tool at the same fine-tuning budget (labels: target sparsity)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


README_BEGIN, README_END = "<!-- peers:begin -->", "<!-- peers:end -->"


def readme_section(results: list[dict]) -> str:
    lines = [README_BEGIN,
             "<!-- generated by `python bench/peers.py --combine ... --readme` from bench/results/peers_*.json; "
             "do not edit by hand -->", ""]  # fmt: skip
    for res in results:
        seeds = len(res.get("seeds", [0]))
        lines += [f"**{res['task']}** ([full table](bench/results/peers_{res['task']}.md), "
                  f"[plot](bench/results/peers_{res['task']}_pareto.png)"
                  + (f"; means over {seeds} fine-tuning seeds, range in brackets" if seeds > 1 else "; one seed")
                  + "): " + " ".join(dominance_summary(res)), "", *tool_table(res), "",
                  "Joint study (best prunq grid point within a BOPs budget):", "", *joint_table(res), ""]  # fmt: skip
        ev = evidence_lines(res)
        if ev:
            lines += ["Peer limits, measured:", "", *ev, ""]
    lines.append(README_END)
    return "\n".join(lines)


def write_readme(results: list[dict], path: Path = ROOT / "README.md") -> None:
    """Replace the text between the README's peers markers (atomically: a temporary file, then rename)."""
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{path}: no {README_BEGIN} ... {README_END} section to fill")
    new = re.sub(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), lambda _: readme_section(results), text,
                 flags=re.S)  # fmt: skip
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(path)


def write(res: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2))
    if "dominance" in res:
        plot(res, RESULTS / f"{name}_pareto.png")
        (RESULTS / f"{name}.md").write_text(summarize(res))
        print((RESULTS / f"{name}.md").read_text())
