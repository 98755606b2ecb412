"""Digits benchmark (issue 2): sparsity x pruning method x bit-widths at one fine-tuning budget,
plus the training-step overhead of masks and fake-quantization. Not a test.

    .venv/bin/python bench/digits.py                 # full grid, ~15-25 min on 2 cores
    .venv/bin/python bench/digits.py --quick         # a smoke run

Writes bench/results/digits.json and bench/results/digits.md (the README's table is copied from it).
Every row uses the same dense model, the same fine-tuning steps and the same seeds; only the
method differs. Memory and BOPs come from prunq's cost model.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from prunq.cost import measure as C
from prunq import quant as Q
from prunq.pipeline.run import evaluate_metric, run_methods, stage_cost
from prunq.prune.pruner import PruneConfig, Pruner
from prunq.pipeline.recipes import load_recipe
from prunq.pipeline.runs import dense_model, make_task
from prunq.tasks.classification.models import build

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "taylor-soft": {"prune.criterion": "taylor", "prune.mode": "soft"},
    "taylor-hard": {"prune.criterion": "taylor", "prune.mode": "hard"},
    "magnitude-hard": {"prune.criterion": "magnitude", "prune.mode": "hard"},
    "random-hard": {"prune.criterion": "random", "prune.mode": "hard"},
}
BITS = [(4, 8), (2, 8), (2, 4)]


def grid(args, recipe, out_rows):
    task = make_task(recipe)
    dense, _, dense_s = dense_model(recipe, task, quiet=True)
    d_metric, _ = evaluate_metric(task, dense)
    d_cost = C.measure(dense, task.example_inputs())
    print(f"dense: top1 {d_metric:.4f}, {d_cost.params} params, trained in {dense_s:.1f}s", flush=True)
    out_rows.append({"method": "dense", "sparsity": 0.0, "bits": "fp32", "seed": recipe.seed, "metric": d_metric,
                     "memory_ratio": 1.0, "bops_ratio": 1.0})  # fmt: skip
    for s in args.sparsity:
        for method in args.methods:
            changes = METHODS[method]
            for seed in range(args.seeds):
                r = recipe.with_(**{"prune.sparsity": s, "seed": recipe.seed + seed, **changes})
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                kw = dict(seed=r.seed, batch_size=r.task.batch_size, history=[], quiet=True)
                (pruned,) = run_methods(model, task, [r.prune], **kw)
                p_cost = stage_cost(model, task, d_cost)
                row = {"method": method, "sparsity": s, "bits": "fp32", "seed": seed, "metric": pruned.metric,
                       "achieved_sparsity": p_cost.sparsity, "memory_ratio": p_cost.memory_ratio,
                       "bops_ratio": p_cost.bops_ratio, "seconds": time.perf_counter() - t0}  # fmt: skip
                out_rows.append(row)
                print(json.dumps(row), flush=True)
                for wb, ab in args.bits:
                    rq = r.with_(**{"quant.weight_bits": wb, "quant.act_bits": ab})
                    qm = copy.deepcopy(model)
                    t0 = time.perf_counter()
                    (comp,) = run_methods(qm, task, [rq.quant], first_position=1, **kw)
                    q_cost = stage_cost(qm, task, d_cost)
                    row = {"method": method, "sparsity": s, "bits": f"w{wb}a{ab}", "seed": seed,
                           "metric": comp.metric, "achieved_sparsity": q_cost.sparsity,
                           "memory_ratio": q_cost.memory_ratio, "bops_ratio": q_cost.bops_ratio,
                           "seconds": time.perf_counter() - t0}  # fmt: skip
                    out_rows.append(row)
                    print(json.dumps(row), flush=True)
    return d_metric


def _time_steps(model, x, y, steps, opt):
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(3):  # warm-up
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def overhead(name, make, shape, batch, steps, rounds):
    """Plain step vs masks + weight fake-quant vs + activation fake-quant, interleaved rounds."""
    torch.manual_seed(0)
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    plain = make().to(memory_format=torch.channels_last)
    wq = copy.deepcopy(plain)
    p = Pruner(wq, PruneConfig(criterion="magnitude", mode="hard", schedule="one_shot"))
    p.prune(0.95)
    wq_only = copy.deepcopy(wq)
    Q.prepare(wq_only, Q.QuantConfig(weight_bits=4, act_bits=32))
    Q.calibrate(wq_only, [(x,)], lambda m, b: m(b[0]))
    full = copy.deepcopy(wq)
    Q.prepare(full, Q.QuantConfig(weight_bits=4, act_bits=8))
    Q.calibrate(full, [(x,)], lambda m, b: m(b[0]))
    models = {"plain": plain, "masks+wq": wq_only, "masks+wq+aq": full}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            m.train()
            times[k].append(_time_steps(m, x, y, steps, opts[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name, "batch": batch, "plain_step_s": med["plain"],
        "ratio_masks_wq": med["masks+wq"] / med["plain"], "ratio_masks_wq_aq": med["masks+wq+aq"] / med["plain"],
    }  # fmt: skip


def summarize(rows, overheads, d_metric, args):
    lines = [
        "# Digits benchmark", "",
        f"`{' '.join(['python', 'bench/digits.py', *sys.argv[1:]])}` — torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"{args.seeds} seed(s) per cell, mean shown. Dense fp32 top-1: {d_metric:.4f}.", "",
        "Top-1 on the 360-image test split / memory_ratio / bops_ratio (both vs dense fp32).", "",
    ]  # fmt: skip
    bits = ["fp32"] + [f"w{w}a{a}" for w, a in args.bits]
    lines.append("| sparsity | method | " + " | ".join(bits) + " |")
    lines.append("|---|---|" + "---|" * len(bits))
    for s in args.sparsity:
        for method in args.methods:
            cells = []
            for b in bits:
                sel = [r for r in rows if r["method"] == method and r["sparsity"] == s and r["bits"] == b]
                if not sel:
                    cells.append("–")
                    continue
                m = statistics.mean(r["metric"] for r in sel)
                cells.append(f"{m:.4f} / {statistics.mean(r['memory_ratio'] for r in sel):.4f} / "
                             f"{statistics.mean(r['bops_ratio'] for r in sel):.5f}")  # fmt: skip
            lines.append(f"| {s:g} | {method} | " + " | ".join(cells) + " |")
    lines += ["", "## Taylor-soft vs magnitude-hard (same budget)", ""]
    for s in args.sparsity:
        for b in bits:
            ts = [r["metric"] for r in rows if r["method"] == "taylor-soft" and r["sparsity"] == s and r["bits"] == b]
            mh = [r["metric"] for r in rows if r["method"] == "magnitude-hard" and r["sparsity"] == s and r["bits"] == b]
            if ts and mh:
                lines.append(f"- {s:g} {b}: taylor-soft {statistics.mean(ts):.4f} vs magnitude-hard "
                             f"{statistics.mean(mh):.4f} (difference {statistics.mean(ts) - statistics.mean(mh):+.4f})")
    if not overheads:
        return "\n".join(lines) + "\n"
    lines += ["", "## Training-step overhead (median of interleaved rounds, same run)", "",
              "| model | batch | plain step (s) | masks + weight fake-quant | + activation fake-quant |",
              "|---|---|---|---|---|"]  # fmt: skip
    for o in overheads:
        lines.append(f"| {o['model']} | {o['batch']} | {o['plain_step_s']:.4f} | {o['ratio_masks_wq']:.3f}× | "
                     f"{o['ratio_masks_wq_aq']:.3f}× |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "digits.yaml")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99, 0.995])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--bits", nargs="+", default=[f"w{w}a{a}" for w, a in BITS], help="e.g. w4a8 w2a4")
    ap.add_argument("--no-overhead", action="store_true", help="skip the training-step overhead measurement")
    ap.add_argument("--overhead-only", action="store_true", help="only the training-step overhead")
    ap.add_argument("--name", default=None, help="output stem under --out (default: digits, or digits_quick)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets, two sparsities: a smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.bits = [tuple(int(v) for v in b.lstrip("w").split("a")) for b in args.bits]
    recipe = load_recipe(args.recipe)
    if args.quick:
        args.sparsity = [0.9, 0.98]
        recipe = recipe.with_(**{"dense.steps": 200, "prune.finetune.steps": 100, "quant.finetune.steps": 50})
    rows: list[dict] = []
    d_metric = float("nan") if args.overhead_only else grid(args, recipe, rows)
    if args.overhead_only:
        args.sparsity = []
    overheads = [] if args.no_overhead else [
        overhead("digits_cnn", lambda: build("digits_cnn"), (1, 8, 8), 64, 20 if args.quick else 60, 3 if args.quick else 7),
        overhead("resnet20 (CIFAR 32×32)", lambda: build("resnet20"), (3, 32, 32), 128, 3 if args.quick else 8, 3 if args.quick else 5),
    ]  # fmt: skip
    for o in overheads:
        print(json.dumps(o), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("digits_quick" if args.quick else "digits_overhead" if args.overhead_only else "digits")
    (args.out / f"{stem}.json").write_text(json.dumps({"rows": rows, "overhead": overheads, "dense_metric": d_metric}, indent=2))
    (args.out / f"{stem}.md").write_text(summarize(rows, overheads, d_metric, args))
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
