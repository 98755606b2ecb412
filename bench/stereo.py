"""Stereo benchmark (issue 3): dense vs compressed StereoNet at sparsity x bit-widths, Taylor-soft and
magnitude-hard, on the synthetic validation split and the real Middlebury motorcycle pair, next to OpenCV's
semi-global block matching (StereoSGBM). Not a test.

    .venv/bin/pip install -e '.[bench]'                 # opencv-python-headless, for StereoSGBM
    .venv/bin/python bench/stereo.py                     # the committed grid (see --help for the knobs)
    .venv/bin/python bench/stereo.py --quick             # a smoke run (tiny budgets, not for results)

One dense model is trained with ``recipes/stereo.yaml`` (or loaded with ``--dense CKPT``); then, for each
method, ``prunq.sweep.run_sweep`` runs stage 1 once per sparsity and stage 2 once per bit-width pair, all
with the recipe's fine-tuning budgets. Writes ``bench/results/<name>.json``, ``<name>.md`` and
``<name>_pareto.png`` (EPE vs BOPs on both splits); memory and BOPs come from prunq's cost model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from prunq.cost import measure as C
from prunq.pipeline.io import load_state
from prunq.pipeline.recipes import load_recipe
from prunq.pipeline.runs import dense_model, make_task
from prunq.pipeline.sweep import run_sweep
from prunq.tasks.stereo.metrics import StereoMeter
from prunq.tasks.stereo.task import _motorcycle

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "taylor-soft": {"prune.criterion": "taylor", "prune.mode": "soft"},
    "magnitude-hard": {"prune.criterion": "magnitude", "prune.mode": "hard"},
}
BITS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4), "w2a8": (2, 8)}
KEYS = ("epe", "d1", "bad1", "bad2", "bad3")


# ---------------------------------------------------------------------------------------------- SGBM
def sgbm_disparity(left: torch.Tensor, right: torch.Tensor, max_disp: int, block: int = 5) -> tuple[np.ndarray, float]:
    """OpenCV StereoSGBM (3-way, colour) on (3, H, W) images in [0, 1]: ``(disparity, density)``.

    Pixels SGBM leaves without a match (occlusions, the left border, failed uniqueness) are filled from
    the nearest valid pixel to their left along the row (the usual background fill; from the right where
    a row starts without one), so every pixel is scored; ``density`` is the fraction SGBM matched itself.
    """
    import cv2

    def u8(img: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

    n_disp = 16 * -(-max_disp // 16)  # a multiple of 16, as SGBM requires
    matcher = cv2.StereoSGBM_create(
        minDisparity=0, numDisparities=n_disp, blockSize=block, P1=8 * 3 * block**2, P2=32 * 3 * block**2,
        disp12MaxDiff=1, uniquenessRatio=10, speckleWindowSize=100, speckleRange=2,
        mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY,
    )  # fmt: skip
    disp = matcher.compute(u8(left), u8(right)).astype(np.float32) / 16.0  # fixed point, 4 fractional bits
    valid = disp >= 0
    density = float(valid.mean())
    h, w = disp.shape
    cols = np.where(valid, np.arange(w)[None, :], -1)
    last = np.maximum.accumulate(cols, axis=1)  # nearest valid column at or left of each pixel
    nxt = np.flip(np.minimum.accumulate(np.flip(np.where(valid, np.arange(w)[None, :], w), 1), axis=1), 1)
    src = np.where(last >= 0, last, np.minimum(nxt, w - 1))
    filled = np.take_along_axis(disp, src, axis=1)
    filled[~valid.any(axis=1)] = 0.0  # a row with no match at all
    return filled, density


def sgbm_reference(task, max_disp: int) -> dict:
    """SGBM's metrics on the validation split and on motorcycle, with its match density and run time."""
    out: dict = {}
    meter, dens = StereoMeter(), []
    for left, right, disp in task.val_batches():
        for i in range(len(left)):
            pred, d = sgbm_disparity(left[i], right[i], max_disp)
            meter.update(pred, disp[i].numpy())
            dens.append(d)
    out["val"] = {**{k: meter.compute()[k] for k in KEYS}, "density": float(np.mean(dens))}
    left, right, disp = _motorcycle()
    meter, t0 = StereoMeter(), time.perf_counter()
    pred, d = sgbm_disparity(left[0], right[0], max_disp)
    meter.update(pred, disp[0].numpy())
    out["middlebury"] = {**{k: meter.compute()[k] for k in KEYS}, "density": d,
                         "seconds": time.perf_counter() - t0}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- grid
def run(args) -> dict:
    recipe = load_recipe(args.recipe)
    for item in args.set:
        key, _, value = item.partition("=")
        recipe = recipe.with_(**{key.strip(): yaml.safe_load(value)})
    if args.quick:
        recipe = recipe.with_(**{
            "task.options": {**recipe.task.options, "n_train": 16, "n_val": 4}, "dense.steps": 20,
            "prune.finetune.steps": 10, "quant.finetune.steps": 5, "quant.calib_batches": 2,
        })  # fmt: skip
    # Evaluation during fine-tuning only draws the report's curves (no_grad, no random draws): off here.
    recipe = recipe.with_(eval_every=0)
    torch.set_num_threads(args.threads)
    task = make_task(recipe)
    t0 = time.perf_counter()
    if args.dense:
        recipe = recipe.with_(**{"model.checkpoint": str(args.dense)})
    model, dense_hist, dense_s = dense_model(recipe, task, quiet=args.quiet)
    if args.save_dense:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.save_dense))
    print(f"dense model ready in {dense_s:.0f} s", flush=True)
    left, right, _ = _motorcycle()
    full = C.measure(model, (left, right))  # the model's size and work at Middlebury's 500 x 741

    max_disp = int(recipe.task.options.get("max_disp", 64))
    sgbm = None
    try:
        sgbm = sgbm_reference(task, max_disp)
    except ImportError:
        print("opencv-python-headless is not installed: no StereoSGBM reference (pip install -e '.[bench]')")

    rows, dense_ref = [], None
    for method in args.methods:
        r = recipe.with_(**METHODS[method])
        with tempfile.TemporaryDirectory(prefix="prunq-bench-stereo-") as tmp:
            points, info = run_sweep(r, args.sparsity, [BITS[b] for b in args.bits], Path(tmp),
                                     quiet=args.quiet, dense=(model, dense_hist), render=False)  # fmt: skip
        dense_ref = info["dense"]
        for p in points:
            p.pop("run")
            rows.append({"method": method, **p})
            print(f"{method} s={p['sparsity']} w{p['weight_bits']}a{p['act_bits']}: val epe {p['metric']:.3f} "
                  f"middlebury epe {p.get('middlebury.epe', float('nan')):.3f} memory x{p['memory_ratio']:.4f} "
                  f"BOPs x{p['bops_ratio']:.5f}", flush=True)  # fmt: skip
    return {
        "commands": [sys.argv[1:]], "recipe": str(args.recipe), "recipe_resolved": recipe.model_dump(mode="json"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "threads": torch.get_num_threads()},
        "dense": {**dense_ref, "seconds": dense_s, "source": str(args.dense) if args.dense else "trained"},
        "full_size": {"height": int(left.shape[-2]), "width": int(left.shape[-1]), "params": full.params,
                      "macs": full.macs},
        "sgbm": sgbm, "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }  # fmt: skip


def combine(parts: list[dict]) -> dict:
    """One result from several runs over the same dense model (their rows concatenated)."""
    first = parts[0]
    for p in parts[1:]:
        if p["dense"]["metric"] != first["dense"]["metric"] or p["recipe_resolved"] != first["recipe_resolved"]:
            raise SystemExit("--combine: the results come from different dense models or recipes")
    commands = [c for p in parts for c in p.get("commands", [])] + [sys.argv[1:]]
    return {**first, "rows": [r for p in parts for r in p["rows"]], "commands": commands,
            "wall_s": max(p["wall_s"] for p in parts)}


# ---------------------------------------------------------------------------------------------- output
def _rel(v: float, ref: float) -> str:
    return f"{100 * (v / ref - 1):+.1f} %"


def _method_section(rr: dict, key: str, kind: str) -> dict:
    """A resolved recipe's method config: ``methods: [...]`` (by ``kind``), or the ``prune:``/``quant:``
    sections of results written before recipes took a method list."""
    if key in rr:
        return rr[key]
    return next(m for m in rr["methods"] if m.get("kind") == kind)


def summarize(res: dict) -> str:
    d = res["dense"]
    dv, dm = d["extra"]["val"], d["extra"].get("middlebury", {})
    rr = res["recipe_resolved"]
    rp, rq = _method_section(rr, "prune", "prune"), _method_section(rr, "quant", "quantize")
    lines = [
        "# Stereo benchmark", "",
        *[f"`python bench/stereo.py {' '.join(a)}`" for a in res.get("commands", [sys.argv[1:]])], "",
        f"One dense StereoNet ({d['params']:,} parameters, {d['macs'] / 1e9:.2f} GMAC at "
        f"{rr['task']['options'].get('height')}x{rr['task']['options'].get('width')}, "
        f"{res['full_size']['macs'] / 1e9:.2f} GMAC at {res['full_size']['height']}x{res['full_size']['width']}), "
        + (f"trained with `{Path(res['recipe']).name}` ({rr['dense']['steps']} steps, "
           f"{res['dense']['seconds'] / 60:.1f} min)" if d.get("source", "trained") == "trained"
           else f"loaded from `{d['source']}`")
        + "; every point "
        f"then gets the recipe's budget: {rp['finetune']['steps']} pruning steps (schedule "
        f"{rp['schedule']}) and {rq['finetune']['steps']} quantization-aware steps. "
        f"`val` = {rr['task']['options'].get('n_val', 32)} synthetic validation scenes; `middlebury` = the "
        "motorcycle pair at full size (500x741). EPE in px (lower is better), D1 = error > 3 px and > 5 %. "
        "Ratios against dense fp32 (prunq's cost model).", "",
        "| model | sparsity | bits | val EPE | val D1 | Middlebury EPE | Middlebury D1 | memory x fp32 | BOPs x fp32 "
        "| val EPE vs dense | Middlebury EPE vs dense |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| dense | 0 % | w32a32 | {dv['epe']:.3f} | {100 * dv['d1']:.1f} % | {dm.get('epe', float('nan')):.3f} | "
        f"{100 * dm.get('d1', float('nan')):.1f} % | 1 | 1 | | |",
    ]  # fmt: skip
    if res.get("sgbm"):
        sv, sm = res["sgbm"]["val"], res["sgbm"]["middlebury"]
        lines.append(f"| StereoSGBM (OpenCV) | — | — | {sv['epe']:.3f} | {100 * sv['d1']:.1f} % | {sm['epe']:.3f} | "
                     f"{100 * sm['d1']:.1f} % | — | — | {_rel(sv['epe'], dv['epe'])} | "
                     f"{_rel(sm['epe'], dm['epe'])} |")  # fmt: skip
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {100 * r['achieved_sparsity']:.1f} % | w{r['weight_bits']}a{r['act_bits']} | "
            f"{r['val.epe']:.3f} | {100 * r['val.d1']:.1f} % | {r['middlebury.epe']:.3f} | "
            f"{100 * r['middlebury.d1']:.1f} % | {r['memory_ratio']:.5f} | {r['bops_ratio']:.5f} | "
            f"{_rel(r['val.epe'], dv['epe'])} | {_rel(r['middlebury.epe'], dm['epe'])} |"
        )
    if res.get("sgbm"):
        s = res["sgbm"]
        lines += ["", f"StereoSGBM (block 5, 3-way, {16 * -(-int(rr['task']['options'].get('max_disp', 64)) // 16)} "
                  f"disparities, unmatched pixels filled from the left) matched {100 * s['middlebury']['density']:.1f} % "
                  f"of motorcycle's pixels and {100 * s['val']['density']:.1f} % of the validation scenes'."]  # fmt: skip
    lines += ["", "**Targets** (issue 3) for every point at >= 95 % sparsity with 4-bit weights and <= 8-bit "
              "activations: validation EPE within 5 % of dense, Middlebury EPE within 10 %, memory_ratio <= 0.02, "
              "bops_ratio <= 0.001.", "",
              "| model | sparsity | bits | val EPE <= +5 % | Middlebury EPE <= +10 % | memory <= 0.02 | BOPs <= 0.001 |",
              "|---|---:|---|:---:|:---:|:---:|:---:|"]  # fmt: skip
    ok = {True: "✓", False: "✗"}
    for r in res["rows"]:
        if r["sparsity"] >= 0.95 and r["weight_bits"] == 4 and r["act_bits"] <= 8:
            lines.append(
                f"| {r['method']} | {100 * r['achieved_sparsity']:.1f} % | w{r['weight_bits']}a{r['act_bits']} | "
                f"{ok[r['val.epe'] <= 1.05 * dv['epe']]} | {ok[r['middlebury.epe'] <= 1.10 * dm['epe']]} | "
                f"{ok[r['memory_ratio'] <= 0.02]} | {ok[r['bops_ratio'] <= 0.001]} |"
            )
    run_metrics = ROOT / "bench" / "results" / "stereo_run" / "metrics.json"
    if run_metrics.is_file():
        m = json.loads(run_metrics.read_text())
        timing = run_metrics.with_name("timing.json")  # runs before timing.json kept it in metrics.json
        t, c = (json.loads(timing.read_text()) if timing.is_file() else m["timing"]), m["compressed"]
        lines += ["", f"**`make stereo`** (`recipes/stereo.yaml` end to end, kept in "
                  f"[`stereo_run/`](stereo_run/report.md)): {t['total_s'] / 60:.1f} min in all — dense training "
                  f"{t['dense_s'] / 60:.1f} min, pruning {t['prune_s'] / 60:.1f} min, quantization-aware "
                  f"fine-tuning {t['quant_s'] / 60:.1f} min. Val EPE {m['dense']['metric']:.3f} (dense) -> "
                  f"{m['pruned']['metric']:.3f} (pruned) -> {c['metric']:.3f} (compressed, "
                  f"{100 * c['sparsity']:.1f} %, w{c['weight_bits']}a{c['act_bits']}); Middlebury EPE "
                  f"{m['dense']['middlebury']['epe']:.3f} -> {m['pruned']['middlebury']['epe']:.3f} -> "
                  f"{c['middlebury']['epe']:.3f}; memory x{m['memory_ratio']:.5f}, BOPs x{m['bops_ratio']:.5f}."]
    lines += ["", f"![EPE vs BOPs]({Path(res['name']).name}_pareto.png)", "",
              f"Longest run: {res['wall_s'] / 60:.1f} min on {res['machine']['threads']} thread(s) "
              f"({res['machine']['platform']}, torch {res['machine']['torch']})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    d = res["dense"]
    markers = {"w8a8": "o", "w4a8": "s", "w4a4": "D", "w2a8": "^"}
    colours = {"taylor-soft": "tab:blue", "magnitude-hard": "tab:orange"}
    for ax, split in zip(axes, ("val", "middlebury")):
        for method in dict.fromkeys(r["method"] for r in res["rows"]):
            pts = [r for r in res["rows"] if r["method"] == method]
            for bits, mk in markers.items():
                sel = [r for r in pts if f"w{r['weight_bits']}a{r['act_bits']}" == bits]
                if sel:
                    ax.scatter([r["bops"] for r in sel], [r[f"{split}.epe"] for r in sel], marker=mk,
                               color=colours.get(method), label=f"{method} {bits}", s=28)  # fmt: skip
        ax.scatter([d["bops"]], [d["extra"][split]["epe"]], marker="*", s=140, color="black", label="dense fp32")
        if res.get("sgbm"):
            ax.axhline(res["sgbm"][split]["epe"], color="grey", ls="--", lw=1, label="StereoSGBM")
        ax.set_xscale("log")
        ax.set_xlabel("BOPs (bit-operations, log)")
        ax.set_ylabel(f"{split} EPE (px, lower is better)")
        ax.set_title("synthetic validation" if split == "val" else "Middlebury motorcycle (full size)")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "stereo.yaml")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--dense", type=Path, help="start from this dense checkpoint (safetensors) instead of training")
    p.add_argument("--save-dense", type=Path, help="write the dense model here (to reuse with --dense)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field for every point, e.g. --set prune.cost_exponent=0.5")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="stereo", help="output name under bench/results/")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run, not results")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--combine", nargs="+", metavar="NAME",
                   help="merge earlier results (same dense model, e.g. one process per method) into --name")
    args = p.parse_args()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        res = combine([json.loads((out / f"{n}.json").read_text()) for n in args.combine])
    else:
        if args.dense:
            load_state(args.dense)  # a missing or corrupt file fails here, before any work
        res = run(args)
    if args.quick and args.name == "stereo":
        args.name = "stereo_quick"  # never over the committed results (and git-ignored)
    res["name"] = args.name
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=2))
    plot(res, out / f"{args.name}_pareto.png")
    (out / f"{args.name}.md").write_text(summarize(res))
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
