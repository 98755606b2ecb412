"""LSQ step-gradient scale at extreme sparsity: ``quant.lsq_grad_n`` "all" vs "nonzero". Not a test.

The LSQ weight-step gradient is scaled by ``1 / sqrt(N * Qp)``. With ``"all"`` (the LSQ paper) ``N`` is
every weight of the step's channel, pruned zeros included; with ``"nonzero"`` only the weights the
channel still has, so at 98 % sparsity the step gradient is ~7x larger. This measures which is better on
the digits recipe at 98-99.5 % sparsity, paired: one dense model, one pruned model per (sparsity,
fine-tuning seed), then the quantize method twice on copies of it, the setting the only difference.

    .venv/bin/python bench/lsq_n.py              # 3 sparsities x 3 seeds x w4a8/w2a8, ~15 min on 1 core
    .venv/bin/python bench/lsq_n.py --quick      # a smoke run (small budgets, one seed)

Writes bench/results/lsq_n.md and bench/results/lsq_n.json (``--quick``: lsq_n_quick.*).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from prunq.pipeline.recipes import load_recipe
from prunq.pipeline.run import evaluate_metric, run_methods
from prunq.pipeline.runs import dense_model, make_task
from prunq.quant.weight import weight_quantizer

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("all", "nonzero")
TEST_IMAGES = 360  # digits' test split: one image is 1/360 of top-1


def _quantizers(model):
    return [(n, q) for n, m in model.named_modules() if (q := weight_quantizer(m)) is not None]


def _snapshot_first_train_step(model, store):
    """Record every weight step at the first training-mode forward (after calibration, before QAT)."""

    def hook(mod, _inputs):
        if mod.training and torch.is_grad_enabled() and not store:
            store.update({n: q.effective_step().clone() for n, q in _quantizers(mod)})
            handle.remove()

    handle = model.register_forward_pre_hook(hook)
    return handle


def step_drift(model, init):
    """Mean |log2(learned step / initial step)| over the channels that still have weights."""
    vals = []
    for n, q in _quantizers(model):
        if n not in init:
            continue
        s0, s1 = init[n], q.effective_step()
        live = (s0 > 0) & (s1 > 0)
        vals += torch.log2(s1[live] / s0[live]).abs().tolist()
    return statistics.mean(vals) if vals else float("nan")


def run(args, recipe):
    task = make_task(recipe)
    dense, _, dense_s = dense_model(recipe, task, quiet=True)
    d_metric, _ = evaluate_metric(task, dense)
    print(f"dense: top1 {d_metric:.4f}, trained in {dense_s:.1f}s", flush=True)
    rows = []
    for s in args.sparsity:
        for seed in range(args.seeds):
            r = recipe.with_(**{"prune.sparsity": s, "seed": recipe.seed + seed})
            kw = dict(seed=r.seed, batch_size=r.task.batch_size, history=[], quiet=True)
            pruned_model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            (pruned,) = run_methods(pruned_model, task, [r.prune], **kw)
            row = {"sparsity": s, "seed": seed, "bits": "fp32", "setting": None, "metric": pruned.metric,
                   "achieved_sparsity": pruned.sparsity, "seconds": time.perf_counter() - t0}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            for wb, ab in args.bits:
                for v in SETTINGS:
                    rq = r.with_(**{"quant.lsq_grad_n": v, "quant.weight_bits": wb, "quant.act_bits": ab})
                    qm = copy.deepcopy(pruned_model)
                    init: dict = {}
                    handle = _snapshot_first_train_step(qm, init)
                    t0 = time.perf_counter()
                    (comp,) = run_methods(qm, task, [rq.quant], first_position=1, **{**kw, "history": []})
                    handle.remove()
                    row = {"sparsity": s, "seed": seed, "bits": f"w{wb}a{ab}", "setting": v, "metric": comp.metric,
                           "step_drift_log2": step_drift(qm, init), "seconds": time.perf_counter() - t0}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return d_metric, rows


def _cell(vals):
    return {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize(rows, args):
    """Per sparsity x bits: each setting's mean and range over seeds, and the paired nonzero - all."""
    out = []
    bits = [f"w{w}a{a}" for w, a in args.bits]
    for s in args.sparsity:
        fp = [r["metric"] for r in rows if r["sparsity"] == s and r["bits"] == "fp32"]
        for b in bits:
            by = {v: {r["seed"]: r for r in rows if r["sparsity"] == s and r["bits"] == b and r["setting"] == v}
                  for v in SETTINGS}  # fmt: skip
            seeds = sorted(set(by["all"]) & set(by["nonzero"]))
            if not seeds:
                continue
            diffs = [by["nonzero"][k]["metric"] - by["all"][k]["metric"] for k in seeds]
            out.append({
                "sparsity": s, "bits": b, "pruned_fp32": _cell(fp),
                **{v: _cell([by[v][k]["metric"] for k in seeds]) for v in SETTINGS},
                "diff": _cell(diffs),
                "wins": sum(d > 1e-9 for d in diffs), "ties": sum(abs(d) <= 1e-9 for d in diffs),
                "losses": sum(d < -1e-9 for d in diffs),
                **{f"drift_{v}": statistics.mean(by[v][k]["step_drift_log2"] for k in seeds) for v in SETTINGS},
            })  # fmt: skip
    return out


def _fmt(c, pct=True):
    f = (lambda x: f"{100 * x:.2f}") if pct else (lambda x: f"{x:.4f}")
    return f"{f(c['mean'])} [{f(c['min'])}, {f(c['max'])}]"


def _fmt_diff(c):
    return f"{100 * c['mean']:+.2f} [{100 * c['min']:+.2f}, {100 * c['max']:+.2f}]"


def render(summary, rows, d_metric, args, wall_s):
    cmd = " ".join(["python", "bench/lsq_n.py", *sys.argv[1:]])
    recipe_path = args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe
    ft = args.quant_finetune
    lines = [
        "# LSQ step-gradient N: all weights vs non-zero weights", "",
        f"`{cmd}` — torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.processor() or platform.machine()}; recipe `{recipe_path}`"
        f"{' (quick budgets)' if args.quick else ''}; {args.seeds} fine-tuning seed(s); {wall_s / 60:.1f} min wall. "
        f"Dense fp32 top-1: {100 * d_metric:.2f} %. QAT: {ft['steps']} steps, {ft['optimizer']}, lr {ft['lr']:g}.", "",
        "One dense model; per (sparsity, seed) one pruned model (the recipe's prune method), then the recipe's "
        "quantize method twice on copies of it, `quant.lsq_grad_n` the only difference (paired). "
        "Top-1 in % on the 360-image test split (one image = 0.28 pt): mean [min, max] over seeds. "
        "`nonzero − all` is the paired difference per seed, mean [min, max]; W/T/L = seeds where nonzero "
        "is better / equal / worse. Drift = mean |log2(learned step / initial step)| over live channels "
        "(how far QAT moved the steps).", "",
        *(["With Adam the per-channel factor `sqrt(N_all / N_nonzero)` is, for a fixed mask, a constant scale "
           "of each step's gradient, which Adam divides out (m / sqrt(v)); it changes the update only where "
           "sqrt(v) is near Adam's eps (1e-8), i.e. channels with almost no live weights, and through the "
           "float-level divergence that follows. Hence the near-equal drift.", ""]
          if ft["optimizer"] in ("adam", "adamw") else []),
        "| sparsity | bits | pruned fp32 | all | nonzero | nonzero − all (pt) | W/T/L | drift all | drift nonzero |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for c in summary:
        lines.append(
            f"| {c['sparsity']:g} | {c['bits']} | {_fmt(c['pruned_fp32'])} | {_fmt(c['all'])} | {_fmt(c['nonzero'])} | "
            f"{_fmt_diff(c['diff'])} | {c['wins']}/{c['ties']}/{c['losses']} | {c['drift_all']:.3f} | "
            f"{c['drift_nonzero']:.3f} |"
        )  # fmt: skip
    lines += ["", "## Pooled paired differences (nonzero − all)", ""]
    for b in sorted({c["bits"] for c in summary}, key=lambda b: [c["bits"] for c in summary].index(b)):
        ds = [r2["metric"] - r1["metric"]
              for r1 in rows if r1["bits"] == b and r1["setting"] == "all"
              for r2 in rows if r2["bits"] == b and r2["setting"] == "nonzero"
              and r2["sparsity"] == r1["sparsity"] and r2["seed"] == r1["seed"]]  # fmt: skip
        if not ds:
            continue
        sd = statistics.stdev(ds) if len(ds) > 1 else float("nan")
        lines.append(
            f"- {b}: {len(ds)} pairs, mean {100 * statistics.mean(ds):+.2f} pt "
            f"({statistics.mean(ds) * TEST_IMAGES:+.2f} test images), sd {100 * sd:.2f} pt, "
            f"W/T/L {sum(d > 1e-9 for d in ds)}/{sum(abs(d) <= 1e-9 for d in ds)}/{sum(d < -1e-9 for d in ds)}"
        )
    all_pairs = [r2["metric"] - r1["metric"]
                 for r1 in rows if r1["setting"] == "all"
                 for r2 in rows if r2["setting"] == "nonzero" and r2["bits"] == r1["bits"]
                 and r2["sparsity"] == r1["sparsity"] and r2["seed"] == r1["seed"]]  # fmt: skip
    if all_pairs:
        m = statistics.mean(all_pairs)
        se = statistics.stdev(all_pairs) / math.sqrt(len(all_pairs)) if len(all_pairs) > 1 else float("nan")
        lines.append(f"- all: {len(all_pairs)} pairs, mean {100 * m:+.2f} pt (± {100 * se:.2f} pt standard error)")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "digits.yaml")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.98, 0.99, 0.995])
    ap.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds 0..n-1 (default 3; --quick 1)")
    ap.add_argument("--bits", nargs="+", default=["w4a8", "w2a8"], help="e.g. w4a8 w2a8")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="small budgets, one seed: a smoke run")
    ap.add_argument("--name", default=None, help="output stem under --out (default: lsq_n, or lsq_n_quick)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.recipe = args.recipe.resolve()
    args.bits = [tuple(int(v) for v in b.lstrip("w").split("a")) for b in args.bits]
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    recipe = load_recipe(args.recipe)
    if args.quick:
        recipe = recipe.with_(**{"dense.steps": 200, "prune.finetune.steps": 100, "quant.finetune.steps": 50})
    args.quant_finetune = recipe.quant.finetune.model_dump(mode="json")
    t0 = time.perf_counter()
    d_metric, rows = run(args, recipe)
    wall = time.perf_counter() - t0
    summary = summarize(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("lsq_n_quick" if args.quick else "lsq_n")
    doc = {
        "command": " ".join(["python", "bench/lsq_n.py", *sys.argv[1:]]), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "recipe": recipe.model_dump(mode="json"), "dense_metric": d_metric,
        "wall_s": wall, "summary": summary, "rows": rows,
    }  # fmt: skip
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    (args.out / f"{stem}.md").write_text(render(summary, rows, d_metric, args, wall))
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
