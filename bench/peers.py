"""prunq side by side with the tools users would otherwise pick (issue 4), and the joint study. Not a test.

    .venv/bin/pip install -e '.[peers]'          # torch-pruning, nncf, brevitas (+ torchao, which nncf needs)
    make bench-peers                              # both tasks, two processes, then --combine (see Makefile)
    .venv/bin/python bench/peers.py --task digits --quick      # a smoke run (tiny budgets, not results)

For one task (the digits CNN or StereoNet), one dense model and one fine-tuning budget (``P`` pruning steps,
``Q`` quantization steps, the task recipe's optimizers and data order), it runs

* **prunq** -- ``prunq.sweep.run_sweep`` over sparsity x (weight, activation) bits with the recipe's
  defaults (Taylor score, soft fine-tuning, gradual schedule, LSQ QAT): the peers' comparison points and the
  joint study's grid at once;
* **torch.nn.utils.prune + QAT** -- global L1 on the cubic schedule, then fake-quant QAT (plain torch ops);
* **NNCF** -- ``nncf.prune`` (magnitude) + fine-tuning, ``nncf.quantize`` (8-bit) + QAT on its model;
* **Torch-Pruning + QAT** -- channel pruning to prunq's BOPs at the same bits, fine-tuned, the same QAT;
* **Brevitas** -- w4a8 QAT of the magnitude-pruned model (the torch.nn.utils.prune one);

(see bench/peer_methods.py) and measures every result with prunq's cost model from its effective weights.
``--part prunq`` / ``--part peers`` split one task over two processes; ``--combine`` joins the parts,
checks Pareto dominance, runs the joint study (best metric within three BOPs budgets: pruning alone at
8 bits, quantization alone at 0 % sparsity, any (sparsity, bits) pair), writes
``bench/results/peers_<task>.{json,md}`` and ``peers_<task>_pareto.png``, and with ``--readme`` the
README's comparison section.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_methods as PM  # noqa: E402

from prunq import cost as C  # noqa: E402
from prunq.io import load_state  # noqa: E402
from prunq.layers import compressible_layers  # noqa: E402
from prunq.recipes import load_recipe  # noqa: E402
from prunq.report import flatten  # noqa: E402
from prunq.runs import dense_model, make_task  # noqa: E402
from prunq.sweep import run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "recipe": "recipes/digits.yaml", "set": {},
        # Digits is easy up to 95 % (bench/results/digits.md): the comparison starts where methods differ.
        "sparsity": [0.98, 0.99, 0.995], "bits": (4, 8),
        "grid_sparsity": [0.0, 0.95, 0.98, 0.99, 0.995],
        "grid_bits": [(8, 8), (4, 8), (4, 4), (2, 4), (2, 2)],
        "budgets": [1 / 256, 1 / 1024, 1 / 4096],  # BOPs x dense fp32; 1/256 = dense w2a2
        "tp_ignore": ["classifier.fc2"],  # the 10 class outputs
    },
    "stereo": {
        # The stereo recipe's budget cut to 600 + 200 steps so that 5 tools x 3 points + the grid fit 45 min.
        "recipe": "recipes/stereo.yaml", "set": {"prune.finetune.steps": 600, "quant.finetune.steps": 200},
        "sparsity": [0.9, 0.95, 0.98], "bits": (4, 8),
        "grid_sparsity": [0.0, 0.9, 0.95, 0.98],
        "grid_bits": [(8, 8), (4, 8), (4, 4), (2, 4), (2, 2)],
        "budgets": [1 / 64, 1 / 256, 1 / 1024],  # BOPs x dense fp32; 1/64 = dense w4a4, 1/256 = dense w2a2
        # the disparity outputs, the refinement output, and the features whose channels the group-wise
        # correlation splits into groups (Torch-Pruning does not know that constraint)
        "tp_ignore": ["agg_out", "refine.conv", "features.block4.conv"],
    },
}  # fmt: skip
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


# ---------------------------------------------------------------------------------------------- running
def evaluate(task, model) -> tuple[float, dict]:
    out = dict(task.evaluate(model))
    return float(out.pop("metric")), flatten(out)


def make_row(tool: str, sparsity: float, wb: int, ab: int, metric: float, extra: dict, cost: C.ModelCost,
             dense_prunable: int, **more: Any) -> dict[str, Any]:  # fmt: skip
    """One result, measured by prunq's cost model (sparsity against the *dense* prunable weights, so that
    removed channels count as pruned)."""
    return {
        "tool": tool, "sparsity": sparsity, "weight_bits": wb, "act_bits": ab, "metric": metric, **extra,
        "achieved_sparsity": 1.0 - cost.nonzeros / dense_prunable, "bops_ratio": cost.bops_ratio,
        "memory_ratio": cost.memory_ratio, "bops": cost.bops, "memory_bits": cost.memory_bits,
        "min_layer_density": min(lc.density for lc in cost.layers), **more,
    }  # fmt: skip


def _log(row: dict) -> None:
    print(f"{row['tool']:<28} s={row['sparsity']:<5} w{row['weight_bits']}a{row['act_bits']}: metric "
          f"{row['metric']:.4f}  sparsity {row['achieved_sparsity']:.4f}  memory x{row['memory_ratio']:.5f}  "
          f"BOPs x{row['bops_ratio']:.6f}", flush=True)  # fmt: skip


def _attempt(evidence: list, tool: str, what: str, fn) -> Any:
    """Run one peer step; a failure is evidence (the error), not the end of the benchmark."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any peer failure is recorded as is
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        evidence.append({"tool": tool, "what": what, "evidence": msg})
        print(f"{tool}: {what} FAILED -- {msg}", flush=True)
        traceback.print_exc()
        return None


def run_prunq(cfg, recipe, task, dense, hist, d_cost, quiet) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunq-bench-peers-") as tmp:
        points, _ = run_sweep(recipe, cfg["grid_sparsity"], cfg["grid_bits"], Path(tmp), quiet=quiet,
                              dense=(dense, hist), render=False)  # fmt: skip
        for p in points:
            run_dir = Path(tmp) / p.pop("run")
            m = json.loads((run_dir / "metrics.json").read_text())
            row = {"tool": "prunq", **p, "min_layer_density": min(lc["density"] for lc in m["layers"])}
            row["achieved_sparsity"] = 1.0 - sum(lc["nonzeros"] for lc in m["layers"]) / d_cost.prunable_params
            rows.append(row)
            _log(row)
    return rows


def run_tp(cfg, recipe, task, dense, d_cost, prunq_rows, evidence) -> list[dict]:
    rows = []
    wb, ab = cfg["bits"]
    for s in cfg["sparsity"]:
        ref = next((r for r in prunq_rows if r["sparsity"] == s and (r["weight_bits"], r["act_bits"]) == (wb, ab)), None)
        if ref is None:
            continue
        out = _attempt(evidence, "Torch-Pruning + QAT", f"channel pruning to prunq's BOPs at s={s}",
                       lambda: PM.tp_run(dense, task, recipe, ref["bops_ratio"], wb, ab, cfg["tp_ignore"]))
        if out is None:
            continue
        metric, extra = evaluate(task, out["model"])
        cost = PM.measure_weights(out["arch"], out["weights"], wb, ab, task, d_cost)
        row = make_row("Torch-Pruning + QAT", s, wb, ab, metric, extra, cost, d_cost.prunable_params,
                       pruned_metric=out["pruned_metric"], tp_ratio=out["ratio"], mac_fraction=out["mac_fraction"],
                       mac_target=out["mac_target"], prunq_bops_ratio=ref["bops_ratio"], prune_s=out["prune_s"],
                       quant_s=out["quant_s"])  # fmt: skip
        rows.append(row)
        _log(row)
    return rows


def run_peers(cfg, recipe, task, dense, d_cost, evidence) -> list[dict]:
    rows = []
    wb, ab = cfg["bits"]
    n = d_cost.prunable_params
    for s in cfg["sparsity"]:
        # torch.nn.utils.prune: gradual magnitude pruning, then plain fake-quant QAT at prunq's bits.
        t0 = time.perf_counter()
        gmp = PM.gmp_prune(dense, task, recipe, s)
        t1 = time.perf_counter()
        g_metric, _ = evaluate(task, gmp)
        qm, qat = PM.plain_qat(gmp, task, recipe, wb, ab)
        metric, extra = evaluate(task, qm)
        cost = PM.measure_weights(PM.plain_copy(qm), qat.effective_weights(), wb, ab, task, d_cost)
        row = make_row("torch.nn.utils.prune + QAT", s, wb, ab, metric, extra, cost, n, pruned_metric=g_metric,
                       prune_s=t1 - t0, quant_s=time.perf_counter() - t1)  # fmt: skip
        rows.append(row)
        _log(row)

        # Brevitas: QAT of that same magnitude-pruned model.
        out = _attempt(evidence, "Brevitas", f"w{wb}a{ab} QAT of the magnitude-pruned model at s={s}",
                       lambda: PM.brevitas_qat(gmp, task, recipe, wb, ab))  # fmt: skip
        if out is not None:
            metric, extra = evaluate(task, out["model"])
            cost = PM.measure_weights(PM.plain_copy(gmp), out["weights"], wb, ab, task, d_cost)
            row = make_row("Brevitas", s, wb, ab, metric, extra, cost, n, pruned_metric=g_metric, prune_s=t1 - t0,
                           quant_s=out["quant_s"])  # fmt: skip
            rows.append(row)
            _log(row)

        # NNCF: its own pruning and its own (8-bit) quantization.
        out = _attempt(evidence, "NNCF", f"nncf.prune + nncf.quantize at s={s}",
                       lambda: PM.nncf_run(dense, task, recipe, s))
        if out is not None:
            metric, extra = evaluate(task, out["model"])
            nb = max(out["weight_bits"] | {0}), max(out["act_bits"] | {0})
            cost = PM.measure_weights(dense, out["weights"], nb[0], nb[1], task, d_cost)
            row = make_row("NNCF", s, nb[0], nb[1], metric, extra, cost, n, pruned_metric=out["pruned_metric"],
                           ptq_metric=out["ptq_metric"], sparsity_after_prune=PM.sparsity_against(out["pruned_weights"], n),
                           sparsity_after_quantize=PM.sparsity_against(out["ptq_weights"], n),
                           nncf_weight_bits=sorted(out["weight_bits"]), nncf_act_bits=sorted(out["act_bits"]),
                           prune_s=out["prune_s"], quant_s=out["quant_s"])  # fmt: skip
            rows.append(row)
            _log(row)
    return rows


def peer_facts(evidence: list, dense, task) -> None:
    """What the peers' public APIs offer, recorded from the installed packages themselves."""
    try:
        import nncf

        params = list(inspect.signature(nncf.quantize).parameters)
        modes = [m.value for m in nncf.QuantizationMode] if hasattr(nncf, "QuantizationMode") else []
        evidence.append({"tool": "NNCF", "what": "bit-width of nncf.quantize",
                         "evidence": f"nncf {nncf.__version__}: nncf.quantize{tuple(params)} takes no bit-width; "
                                     f"its other modes are {modes}"})  # fmt: skip
        # NNCF's only sub-8-bit integer path: weight-only compression. What it does to this model:
        ex = task.example_inputs()
        cw = nncf.compress_weights(copy.deepcopy(dense).eval(), mode=nncf.CompressWeightsMode.INT4_SYM,
                                   dataset=nncf.Dataset([ex if len(ex) > 1 else ex[0]]))  # fmt: skip
        hooks = cw._modules["__nncf_hooks"]
        kinds = {k.split(":weight")[0].replace(":", "."): type(h).__name__ for k, v in hooks.post_hooks.items()
                 for h in v.values()}  # fmt: skip
        n4 = sum("INT4" in v for v in kinds.values())
        n_act = sum(1 for _ in hooks.pre_hooks.values())
        evidence.append({"tool": "NNCF", "what": "nncf.compress_weights(mode=INT4_SYM), its sub-8-bit path",
                         "evidence": f"{n4} of {len(kinds)} layers at 4 bits, the rest "
                                     f"{sorted(set(v for v in kinds.values() if 'INT4' not in v))}; "
                                     f"{n_act} activation quantizers (weight-only)"})  # fmt: skip
    except Exception as e:  # noqa: BLE001 - recorded as evidence
        evidence.append({"tool": "NNCF", "what": "API facts", "evidence": f"{type(e).__name__}: {e}"[:300]})
    for mod, tool in (("torch_pruning", "Torch-Pruning"), ("brevitas", "Brevitas")):
        try:
            m = __import__(mod)
            evidence.append({"tool": tool, "what": "version", "evidence": f"{mod} {getattr(m, '__version__', '?')}"})
        except ImportError as e:
            evidence.append({"tool": tool, "what": "import", "evidence": str(e)})


def run(args) -> dict:
    cfg = TASKS[args.task]
    recipe = load_recipe(ROOT / cfg["recipe"])
    recipe = recipe.with_(**cfg["set"], eval_every=0)
    for item in args.set:
        key, _, value = item.partition("=")
        recipe = recipe.with_(**{key.strip(): yaml.safe_load(value)})
    if args.quick:
        cfg = {**cfg, "sparsity": [0.9], "grid_sparsity": [0.0, 0.9], "grid_bits": [(8, 8), (4, 8)]}
        changes = {"dense.steps": 30, "prune.finetune.steps": 20, "quant.finetune.steps": 10, "quant.calib_batches": 2,
                   "prune.score_batches": 2}  # fmt: skip
        if args.task == "stereo":
            changes["task.options"] = {**recipe.task.options, "n_train": 16, "n_val": 4}
        recipe = recipe.with_(**changes)
    torch.set_num_threads(args.threads)
    task = make_task(recipe)
    t0 = time.perf_counter()
    if args.dense:
        recipe = recipe.with_(**{"model.checkpoint": str(args.dense)})
    dense, hist, dense_s = dense_model(recipe, task, quiet=args.quiet)
    base_recipe = recipe
    recipe = recipe.with_(seed=recipe.seed + (args.seed or 0))  # fine-tuning seed; the dense model is the same
    d_metric, d_extra = evaluate(task, dense)
    d_cost = C.measure(dense, task.example_inputs())
    print(f"dense: metric {d_metric:.4f} ({dense_s:.0f} s)", flush=True)
    rows: list[dict] = []
    evidence: list[dict] = []
    if args.part in ("prunq", "all"):
        rows += run_prunq(cfg, recipe, task, dense, hist, d_cost, args.quiet)
        rows += run_tp(cfg, recipe, task, dense, d_cost, rows, evidence)
    if args.part in ("peers", "all"):
        peer_facts(evidence, dense, task)
        rows += run_peers(cfg, recipe, task, dense, d_cost, evidence)
    for r in rows:
        r["seed"] = args.seed or 0
    return {
        "task": args.task, "metric_name": task.metric_name, "higher_is_better": task.higher_is_better,
        "commands": [sys.argv[1:]], "recipe_resolved": base_recipe.model_dump(mode="json"), "seeds": [args.seed or 0],
        "config": {k: v for k, v in cfg.items()},
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "threads": torch.get_num_threads()},
        "dense": {"metric": d_metric, **d_extra, "params": d_cost.params, "prunable_params": d_cost.prunable_params,
                  "macs": d_cost.macs, "bops": d_cost.dense_fp32_bops, "memory_bits": d_cost.dense_fp32_memory_bits,
                  "seconds": dense_s, "source": str(args.dense) if args.dense else "trained"},
        "rows": rows, "evidence": evidence, "wall_s": {args.part: time.perf_counter() - t0},
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- analysis
def _better(a: float, b: float, higher: bool) -> bool:
    """``a`` at least as good as ``b``."""
    return a >= b if higher else a <= b


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


def summarize(res: dict) -> str:
    rr = res["recipe_resolved"]
    d = res["dense"]
    pts = sum(1 for r in res["rows"] if r["tool"] == "prunq")
    lines = [
        f"# prunq vs peers: {res['task']}", "",
        *[f"`python bench/peers.py {' '.join(a)}`" for a in res["commands"]], "",
        f"One dense model ({d['params']:,} parameters, {d['source']}), then every tool gets the same budget: "
        f"{rr['prune']['finetune']['steps']} pruning fine-tuning steps and {rr['quant']['finetune']['steps']} "
        f"quantization steps ({rr['prune']['finetune']['optimizer']}, the task recipe's learning rates and batches"
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

    from prunq.plots import pareto_front

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=list(TASKS), default="digits")
    p.add_argument("--part", choices=["all", "prunq", "peers"], default="all",
                   help="prunq = the grid + Torch-Pruning (which needs prunq's BOPs); peers = the other tools")
    p.add_argument("--dense", type=Path, help="start from this dense checkpoint (safetensors) instead of training")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--seed", type=int, help="fine-tuning seed offset (the dense model stays the same): writes "
                   "peers_<task>[_<part>]_seed<N>, to --combine with the other seeds into means")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run, not results")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--combine", nargs="+", metavar="NAME", help="join part results (bench/results/NAME.json) into "
                   "peers_<task> and analyse them; with --part all a run is analysed directly")
    p.add_argument("--readme", nargs="*", metavar="TASK", help="rewrite the README section from peers_<TASK>.json")
    args = p.parse_args()
    if args.readme is not None and not args.combine and args.readme:
        write_readme([json.loads((RESULTS / f"peers_{t}.json").read_text()) for t in args.readme])
        return
    if args.combine:
        res = analyse(combine([json.loads((RESULTS / f"{n}.json").read_text()) for n in args.combine]))
        name = f"peers_{res['task']}" + ("_quick" if args.quick else "")
    else:
        if args.dense:
            load_state(args.dense)  # a missing or corrupt file fails here, before any work
        res = run(args)
        name = (f"peers_{args.task}" + ("" if args.part == "all" else f"_{args.part}")
                + (f"_seed{args.seed}" if args.seed is not None else "") + ("_quick" if args.quick else ""))
        if args.part == "all" and args.seed is None:
            res = analyse(res)
    write(res, name)
    if args.readme is not None:
        tasks = args.readme or [t for t in TASKS if (RESULTS / f"peers_{t}.json").is_file()]
        write_readme([json.loads((RESULTS / f"peers_{t}.json").read_text()) for t in tasks])


if __name__ == "__main__":
    main()
