"""Real speed from sparsity on a CPU (issue 12, first part): prunq.sparsify against the dense model. Not a test.

    .venv/bin/python bench/speed.py            # about 5 min on 2 cores
    .venv/bin/python bench/speed.py --quick    # a smoke run

For the digits CNN (batch 64), ResNet-20 (batch 64, 32x32) and StereoNet (the committed dense checkpoint,
one Middlebury pair at 500x741): the model with its weights magnitude-pruned (global, element) to 0 / 90 /
95 / 98 / 99 %, converted, then (a) as it is — dense eager — and (b) after :func:`prunq.sparsify`, which
times each Linear / Conv2d on its real input, dense kernel vs CSR matmul, and keeps the faster. Interleaved
rounds (bench/quant_speed.py's timer), 2 threads, medians with interquartile ranges; per-layer dense vs
sparse times for StereoNet at 95 %. Plus StereoNet's BOPs split (weight x activation vs activation x
activation products) at 95 % and 98 % w4a8, from prunq's cost model.

Writes ``bench/results/speed.json`` and ``speed.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_speed import _WAIT_BUDGET, _quartiles, interleaved  # noqa: E402

import prunq  # noqa: E402
from prunq.cost.measure import measure  # noqa: E402
from prunq.pipeline.io import load_state  # noqa: E402
from prunq.runtime.sparse import sparsify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
SPARSITIES = (0.0, 0.90, 0.95, 0.98, 0.99)
LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def prune_global(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the smallest-magnitude ``sparsity`` of all conv / linear weights (one global threshold)."""
    model = copy.deepcopy(model).eval()
    if sparsity <= 0:
        return model
    with torch.no_grad():
        ws = [m.weight for m in model.modules() if isinstance(m, LAYERS)]
        flat = torch.cat([w.abs().flatten() for w in ws])
        thr = flat.kthvalue(max(1, int(sparsity * flat.numel()))).values
        for w in ws:
            w.mul_((w.abs() > thr).to(w.dtype))
    return model


def models(quick: bool) -> dict[str, tuple[nn.Module, tuple]]:
    torch.manual_seed(0)
    digits = prunq.get_task("digits")
    d = digits.build_model("digits_cnn")
    from prunq.tasks.classification.models import build

    r = build("resnet20", in_channels=3, num_classes=10)
    from prunq.tasks.stereo.task import _motorcycle

    st = prunq.get_task("stereo", height=64, width=256, max_disp=64, n_train=2, n_val=1, eval_middlebury=False)
    s = st.build_model("stereo_net")
    s.load_state_dict(load_state(ROOT / "bench" / "assets" / "stereo_dense.safetensors"))
    left, right, _ = _motorcycle()
    x_digits = torch.cat([x for x, _ in digits.test_batches()])[:64]
    return {
        "digits_cnn (batch 64)": (d, (x_digits,)),
        "resnet20 (batch 64, random weights)": (r, (torch.randn(64, 3, 32, 32),)),
        "stereo_net (500x741)": (s, (left, right)),
    }


def time_pair(dense: nn.Module, sparse: nn.Module, inputs: tuple, rounds: int, min_s: float) -> dict[str, Any]:
    def run(m: nn.Module):
        def fn() -> None:
            with torch.no_grad():
                m(*inputs)

        return fn

    res = interleaved({"dense": run(dense), "sparse": run(sparse)}, rounds=rounds, min_s=min_s, max_foreign=0.25,
                      max_wait_s=20.0)  # fmt: skip
    kept = res["kept"]
    out: dict[str, Any] = {"rounds_kept": len(kept), "rounds": rounds, "clean": res["clean"]}
    for k in ("dense", "sparse"):
        q1, med, q3 = _quartiles([res["times"][k][i] for i in kept])
        out[k] = {"median_ms": 1e3 * med, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3}
    q1, med, q3 = _quartiles([res["times"]["dense"][i] / res["times"]["sparse"][i] for i in kept])
    out["speedup"] = {"median": med, "q1": q1, "q3": q3}
    return out


def bops_split(stereo: nn.Module, inputs: tuple) -> dict[str, Any]:
    """Weight vs activation BOPs of StereoNet at 500x741, pruned (global magnitude) and quantized w4a8."""
    from prunq.quant import QuantConfig, calibrate, convert, prepare

    out = {}
    dense_cost = measure(stereo, inputs)
    out["dense_fp32"] = {"weight_bops": dense_cost.weight_bops, "act_bops": dense_cost.act_bops}
    for s in (0.95, 0.98):
        m = prune_global(stereo, s)
        prepare(m, QuantConfig(weight_bits=4, act_bits=8))
        calibrate(m, [inputs])
        convert(m)
        c = measure(m, inputs, reference=dense_cost)
        out[f"{s:g}_w4a8"] = {"weight_bops": c.weight_bops, "act_bops": c.act_bops, "bops_ratio": c.bops_ratio,
                             "sites": [{"name": x.name, "bits": list(x.bits), "macs": x.macs, "bops": x.bops}
                                       for x in c.act_sites]}  # fmt: skip
    return out


def write_md(res: dict[str, Any], path: Path) -> None:
    lines = ["# Sparse CPU runtime: prunq.sparsify against dense eager", "",
             f"`{' '.join(['python', 'bench/speed.py', *res['argv']])}` — torch {res['machine']['torch']}, "
             f"{THREADS} threads, {res['machine']['platform']}; {res['wall_s'] / 60:.1f} min.", "",
             "Weights magnitude-pruned (global, element), converted; *sparse* = after `prunq.sparsify` (each "
             "Linear/Conv2d timed on its input, CSR kept only where faster). Median ms [IQR]; speed-up = median "
             "of per-round dense/sparse ratios.", "",
             "| model | sparsity | dense eager | sparsify | speed-up | layers swapped | rounds kept |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, rows in res["models"].items():
        for s, r in rows.items():
            t = r["timing"]
            lines.append(f"| {name} | {100 * float(s):.0f} % | {t['dense']['median_ms']:.3g} [{t['dense']['q1_ms']:.3g}–"
                         f"{t['dense']['q3_ms']:.3g}] | {t['sparse']['median_ms']:.3g} [{t['sparse']['q1_ms']:.3g}–"
                         f"{t['sparse']['q3_ms']:.3g}] | {t['speedup']['median']:.2f}× | {r['swapped']}/{r['candidates']} | "
                         f"{t['rounds_kept']}/{t['rounds']} |")  # fmt: skip
    per = res.get("stereo_layers_95")
    if per:
        lines += ["", "## StereoNet at 95 %, per layer (sparsify's own timing on the layer's input, 500x741)", "",
                  "| layer | sparsity | dense ms | CSR ms |", "|---|---:|---:|---:|"]  # fmt: skip
        for n, r in per.items():
            if "dense_ms" in r:
                lines.append(f"| `{n}` | {100 * r['sparsity']:.1f} % | {r['dense_ms']:.3g} | {r['sparse_ms']:.3g} |")
    split = res.get("bops_split")
    if split:
        lines += ["", "## StereoNet BOPs at 500x741: weight x activation vs activation x activation (cost model)", "",
                  "| model | weight BOPs | activation BOPs | activation share |", "|---|---:|---:|---:|"]  # fmt: skip
        for k, v in split.items():
            tot = v["weight_bops"] + v["act_bops"]
            lines.append(f"| {k} | {v['weight_bops']:.4g} | {v['act_bops']:.4g} | {100 * v['act_bops'] / tot:.1f} % |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--name", default="speed")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    _WAIT_BUDGET[0] = 300.0
    t0 = time.perf_counter()
    rounds, min_s = (3, 0.05) if args.quick else (7, 0.3)
    res: dict[str, Any] = {"argv": sys.argv[1:], "models": {},
                           "machine": {"torch": torch.__version__, "platform": platform.platform()}}  # fmt: skip
    for name, (model, inputs) in models(args.quick).items():
        rows = {}
        for s in (SPARSITIES if not args.quick else (0.0, 0.95)):
            dense = prune_global(model, s)
            sparse = copy.deepcopy(dense)
            report = sparsify(sparse, inputs)
            with torch.no_grad():
                a, b = dense(*inputs), sparse(*inputs)
            err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
            rows[f"{s:g}"] = {"timing": time_pair(dense, sparse, inputs, rounds, min_s), "max_rel_diff": err,
                              "swapped": sum(r["sparse"] for r in report.values()), "candidates": len(report)}  # fmt: skip
            if name.startswith("stereo") and s == 0.95:
                res["stereo_layers_95"] = report
            print(name, s, json.dumps(rows[f"{s:g}"]["timing"]["speedup"]), rows[f"{s:g}"]["swapped"], flush=True)
        res["models"][name] = rows
        if name.startswith("stereo"):
            res["bops_split"] = bops_split(model, inputs)
    res["wall_s"] = time.perf_counter() - t0
    out = ROOT / "bench" / "results"
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=2))
    write_md(res, out / f"{args.name}.md")
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
