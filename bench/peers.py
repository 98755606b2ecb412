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

(see bench/peer_methods.py) and measures every result with prunq's cost model from its effective weights;
bench/peer_report.py turns the results into the verdicts, tables, plot and README section.
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
from peer_report import RESULTS, analyse, combine, write, write_readme  # noqa: E402

from prunq.cost import measure as C  # noqa: E402
from prunq.pipeline.io import load_state  # noqa: E402
from prunq.pipeline.recipes import load_recipe  # noqa: E402
from prunq.report.report import flatten  # noqa: E402
from prunq.pipeline.runs import dense_model, make_task  # noqa: E402
from prunq.pipeline.sweep import run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
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
