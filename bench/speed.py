"""Real speed from sparsity on a CPU (issue 12): what each way of running a pruned model costs. Not a test.

    .venv/bin/python bench/speed.py            # about 15 min on 2 cores
    .venv/bin/python bench/speed.py --quick    # a smoke run
    .venv/bin/python bench/speed.py --readme   # only rewrite README's Speed section from speed.json

For the digits CNN (batch 64), ResNet-20 (batch 64, 32x32, random weights) and StereoNet (the committed
dense checkpoint, one Middlebury pair at 500x741), at 0 / 90 / 95 / 98 / 99 % element sparsity (global
magnitude), one interleaved timing group per row, 2 threads, medians with interquartile ranges:

* *dense eager*: the unpruned model, the reference of every ratio;
* *masked eager*: prunq's training-time form, the pruned model with its mask parametrizations;
* *sparse runtime*: converted, then :func:`prunq.sparsify` (each Linear / Conv2d timed on its real
  input, dense kernel vs the sparse form, the faster kept);
* *channel-removed*: the same model pruned by **whole channels** instead, to the same weight MACs (cost
  model, dead channels not counted), then :func:`prunq.remove_channels` — a smaller dense model;
* *ORT fp32 / int8* (0 and 95 % only: ONNX Runtime's kernels are dense): the pruned model exported by
  prunq (``onnx-fp32``; ``onnx`` QDQ after w8a8 calibration).

Plus per-layer dense vs sparse times for StereoNet at 95 % and StereoNet's BOPs split (weight x
activation vs activation x activation products) at 95 % and 98 % w4a8, from prunq's cost model.

Writes ``bench/results/speed.json``, ``speed.md`` and README's Speed section (between its markers).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_speed import _WAIT_BUDGET, _quartiles, interleaved  # noqa: E402

import prunq  # noqa: E402
from prunq.core.graph import ChannelGraph  # noqa: E402
from prunq.core.layers import compressible_layers, out_channels  # noqa: E402
from prunq.cost.measure import measure  # noqa: E402
from prunq.pipeline.io import load_state  # noqa: E402
from prunq.prune import masks as M  # noqa: E402
from prunq.prune.structured import remove_channels  # noqa: E402
from prunq.runtime.sparse import sparsify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
SPARSITIES = (0.0, 0.90, 0.95, 0.98, 0.99)
ORT_AT = (0.0, 0.95)
LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
README_BEGIN, README_END = "<!-- speed:begin -->", "<!-- speed:end -->"


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


def masked(pruned: nn.Module, dense: nn.Module) -> nn.Module:
    """The dense weights under prunq's (hard) mask parametrizations, masks = the pruned model's non-zeros."""
    model = copy.deepcopy(dense).eval()
    zeros = {n: m.weight.detach() != 0 for n, m in pruned.named_modules() if isinstance(m, LAYERS)}
    for name, m in model.named_modules():
        if isinstance(m, LAYERS):
            M.attach_mask(m, soft=False)
            with torch.no_grad():
                M.get_mask(m).mask.copy_(zeros[name].to(m.weight.dtype))
    return model


def channel_prune(model: nn.Module, inputs: tuple, fraction: float) -> nn.Module:
    """Zero ``fraction`` of the output channels of every layer (smallest filter norm), the way a
    structured pruner removes a channel: the filter, its bias and its BatchNorm's scale and shift.

    Channels coupled by the channel graph (a residual stream, a concatenation) are chosen together: the
    groups of a set of coupled layers are ranked by their summed (per-layer normalised) filter norms.
    Channels the graph says escape (the output, the correlation volume's features) are never pruned."""
    model = copy.deepcopy(model).eval()
    if fraction <= 0:
        return model
    graph = ChannelGraph.build(model, inputs)
    layers = dict(compressible_layers(model))
    norms = {}
    for name, m in layers.items():
        w = m.weight.detach()
        w = w.transpose(0, 1) if isinstance(m, nn.ConvTranspose2d) else w
        n = w.reshape(w.shape[0], -1).norm(dim=1)
        norms[name] = n / n.mean().clamp_min(1e-12)
    clusters = [sorted(g) for g in graph.coupled_groups()]  # disjoint: channels that go together
    grouped = {x for g in clusters for x in g}
    clusters += [[(name, c)] for name, m in layers.items() if getattr(m, "groups", 1) == 1
                 for c in range(out_channels(m)) if (name, c) not in grouped]  # fmt: skip
    escaped = graph.escaped()
    buckets: dict[frozenset, list] = {}
    for every in clusters:
        if any(x[0].startswith("<") or x in escaped or x[0] not in norms for x in every):
            continue
        key = frozenset(x[0] for x in every)
        buckets.setdefault(key, []).append((sum(float(norms[x[0]][x[1]]) for x in every), sorted(every)))
    bn_of = dict(graph.conv_bn_pairs())
    named = dict(model.named_modules())
    with torch.no_grad():
        for entries in buckets.values():
            entries.sort(key=lambda e: e[0])
            k = min(len(entries) - 1, round(fraction * len(entries)))
            for _, every in entries[:k]:
                for name, c in every:
                    m = layers[name]
                    if isinstance(m, nn.ConvTranspose2d):
                        m.weight[:, c] = 0.0
                    else:
                        m.weight[c] = 0.0
                    if m.bias is not None:
                        m.bias[c] = 0.0
                    bn = named[bn_of[name]] if name in bn_of else None
                    if bn is not None:
                        bn.weight[c] = 0.0
                        bn.bias[c] = 0.0
    return model


def weight_macs(model: nn.Module, inputs: tuple) -> float:
    """Live weight MACs (cost model at fp32: zeros and dead input channels not counted)."""
    return measure(model, inputs).weight_bops / (32 * 32)


def matched_channels(dense: nn.Module, inputs: tuple, target: float, dense_macs: float) -> dict[str, Any]:
    """Channel pruning + removal whose model has ``target`` of the dense live weight MACs (bisection on
    the per-layer fraction)."""
    lo, hi, best = 0.0, 0.99, None
    for _ in range(9):
        q = (lo + hi) / 2
        r = remove_channels(channel_prune(dense, inputs, q), inputs)
        ratio = weight_macs(r.model, inputs) / dense_macs
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (q, ratio, r)
        lo, hi = (q, hi) if ratio > target else (lo, q)
    q, ratio, r = best
    return {"fraction": q, "mac_ratio": ratio, "model": r.model.eval(), "removed": r.removed,
            "kept": len(r.kept), "max_rel_diff": r.max_rel_diff}  # fmt: skip


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


def time_group(models: dict[str, Any], inputs: tuple, rounds: int, min_s: float) -> dict[str, Any]:
    """Interleaved rounds over ``models`` (torch modules or ORT sessions); medians [IQR] and the median
    of per-round ratios ``dense / other``."""

    def run(m: Any):
        if isinstance(m, nn.Module):
            def fn() -> None:
                with torch.no_grad():
                    m(*inputs)
        else:
            feed = {i.name: x.numpy() for i, x in zip(m.get_inputs(), inputs)}

            def fn() -> None:
                m.run(None, feed)

        return fn

    res = interleaved({k: run(m) for k, m in models.items()}, rounds=rounds, min_s=min_s, max_foreign=0.25,
                      max_wait_s=20.0)  # fmt: skip
    kept = res["kept"]
    out: dict[str, Any] = {"rounds_kept": len(kept), "rounds": rounds, "clean": res["clean"]}
    for k, v in res["times"].items():
        q1, med, q3 = _quartiles([v[i] for i in kept])
        out[k] = {"median_ms": 1e3 * med, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3}
        if k != "dense":
            q1, med, q3 = _quartiles([res["times"]["dense"][i] / v[i] for i in kept])
            out[k]["speedup"] = {"median": med, "q1": q1, "q3": q3}
    return out


def ort_sessions(pruned: nn.Module, inputs: tuple) -> dict[str, Any]:
    """ONNX Runtime sessions (2 threads) of prunq's fp32 export and of its int8 QDQ export after w8a8
    calibration on ``inputs``."""
    import onnxruntime as ort

    from prunq.export.onnx_qdq import to_onnx_fp32, to_onnx_qdq
    from prunq.quant import QuantConfig, calibrate, convert, prepare

    def session(proto: Any) -> Any:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's idle workers spin for a while after each run: they would steal the CPU from whatever the
        # interleaved rounds time next (always the same neighbour, since the order only rotates)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    q = copy.deepcopy(pruned)
    prepare(q, QuantConfig(weight_bits=8, act_bits=8))
    calibrate(q, [inputs])
    convert(q)
    return {"ort_fp32": session(to_onnx_fp32(pruned, inputs)), "ort_int8": session(to_onnx_qdq(q.eval(), inputs))}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def run_model(name: str, dense: nn.Module, inputs: tuple, sparsities: tuple, rounds: int, min_s: float,
              res: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    dense = dense.eval()
    dense_macs = weight_macs(dense, inputs)
    rows = {}
    for s in sparsities:
        t0 = time.perf_counter()
        pruned = prune_global(dense, s)
        sparse = copy.deepcopy(pruned)
        report = sparsify(sparse, inputs)
        target = weight_macs(pruned, inputs) / dense_macs
        ch = matched_channels(dense, inputs, target, dense_macs) if s > 0 else None
        group: dict[str, Any] = {"dense": dense, "masked": masked(pruned, dense), "sparse": sparse}
        if ch is not None:
            group["channels"] = ch["model"]
            # the smaller model through the runtime too: every conv timed, dense kernel vs the direct one
            # (which wins on a few channels, where oneDNN pads to its 8/16-channel blocks)
            group["channels_rt"] = copy.deepcopy(ch["model"])
            ch["runtime_swapped"] = sum(r["sparse"] for r in sparsify(group["channels_rt"], inputs, min_sparsity=0.0).values())
        if s in ORT_AT:
            group.update(ort_sessions(pruned, inputs))
        with torch.no_grad():
            ref = pruned(*inputs)
            diffs = {"sparse": _rel(ref, sparse(*inputs)), "masked": _rel(ref, group["masked"](*inputs))}
        row: dict[str, Any] = {
            "timing": time_group(group, inputs, rounds, min_s), "mac_ratio": target, "max_rel_diff": diffs,
            "swapped": sum(r["sparse"] for r in report.values()), "candidates": len(report),
        }  # fmt: skip
        if ch is not None:
            row["channels"] = {k: v for k, v in ch.items() if k != "model"}
            row["channels"]["params"] = sum(p.numel() for p in ch["model"].parameters())
        rows[f"{s:g}"] = row
        if name.startswith("stereo") and s == 0.95:
            res["stereo_layers_95"] = report
        t = row["timing"]
        print(name, s, {k: round(v["speedup"]["median"], 2) for k, v in t.items() if isinstance(v, dict) and "speedup" in v},
              f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    return rows


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


def _cell(t: dict[str, Any], key: str) -> str:
    v = t.get(key)
    if not v:
        return "–"
    sp = v.get("speedup")
    return f"{v['median_ms']:.3g} [{v['q1_ms']:.3g}–{v['q3_ms']:.3g}]" + (f" **{sp['median']:.2f}×**" if sp else "")


def table(res: dict[str, Any]) -> list[str]:
    """One row per model and sparsity: median ms [IQR] and speed-up over dense eager."""
    lines = ["| model | sparsity | weight MACs | dense eager | masked eager | sparse runtime | channel-removed "
             "(same MACs) | + runtime | ORT fp32 | ORT int8 | rounds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, rows in res["models"].items():
        for s, r in rows.items():
            t = r["timing"]
            sparse = _cell(t, "sparse") + f" ({r['swapped']}/{r['candidates']} swapped)"
            ch = r.get("channels")
            chan = _cell(t, "channels") + (f" ({100 * ch['mac_ratio']:.1f} % MACs)" if ch else "")
            lines.append(f"| {name} | {100 * float(s):.0f} % | {100 * r['mac_ratio']:.1f} % | {_cell(t, 'dense')} | "
                         f"{_cell(t, 'masked')} | {sparse} | {chan} | {_cell(t, 'channels_rt')} | {_cell(t, 'ort_fp32')} | "
                         f"{_cell(t, 'ort_int8')} | "
                         f"{t['rounds_kept']}/{t['rounds']} |")  # fmt: skip
    return lines


def targets(res: dict[str, Any]) -> list[str]:
    """The issue's targets, read off the results."""
    out = []
    st = res["models"].get("stereo_net (500x741)", {})
    for s, want in (("0.95", 2.0), ("0.99", 4.0)):
        if s in st:
            got = st[s]["timing"]["sparse"]["speedup"]["median"]
            out.append(f"StereoNet {s[2:]} %: sparse runtime {got:.2f}× dense eager (target ≥ {want:g}×: "
                       f"{'met' if got >= want else 'not met'})")  # fmt: skip
    for name, rows in res["models"].items():
        if name.startswith("stereo"):
            continue
        for s, r in rows.items():
            ch = r.get("channels")
            if not ch:
                continue
            lat = 1 / r["timing"]["channels"]["speedup"]["median"]
            rt = 1 / r["timing"]["channels_rt"]["speedup"]["median"]
            bound = 1.5 * ch["mac_ratio"]
            out.append(f"{name.split(' ')[0]} {100 * float(s):.0f} %: channel-removed latency {lat:.3f} of dense, "
                       f"{rt:.3f} through the runtime, at {ch['mac_ratio']:.3f} of its MACs (target ≤ {bound:.3f}: "
                       f"{'met' if min(lat, rt) <= bound else 'not met'})")  # fmt: skip
    return out


def write_md(res: dict[str, Any], path: Path) -> None:
    lines = ["# Real speed from sparsity on a CPU", "",
             f"`{' '.join(['python', 'bench/speed.py', *res['argv']])}` — torch {res['machine']['torch']}, "
             f"onnxruntime {res['machine'].get('onnxruntime', '?')}, {THREADS} threads, {res['machine']['platform']}; "
             f"{res['wall_s'] / 60:.1f} min.", "",
             "Element rows: weights magnitude-pruned (global). *masked eager*: prunq's mask parametrizations; "
             "*sparse runtime*: converted + `prunq.sparsify`; *channel-removed*: pruned by whole channels to the "
             "same live weight MACs (cost model) instead, then `prunq.remove_channels`; *+ runtime*: that model "
             "through `prunq.sparsify(min_sparsity=0)`; ORT: prunq's `onnx-fp32` "
             "and `onnx` (int8 QDQ, w8a8) exports of the element-pruned model. Median ms [IQR] of interleaved "
             "rounds; **×** = median of per-round ratios dense eager / this (above 1: faster).", "",
             *table(res), "", "## Targets", "", *[f"- {t}" for t in targets(res)]]  # fmt: skip
    per = res.get("stereo_layers_95")
    if per:
        lines += ["", "## StereoNet at 95 %, per layer (sparsify's own timing on the layer's input, 500x741)", "",
                  "Dense = the conv and the BatchNorm / ReLU it would absorb; direct = the C++ kernel with them "
                  "fused; CSR = unfold + CSR matmul.", "",
                  "| layer | sparsity | dense ms | direct ms | CSR ms | runs as | fused |",
                  "|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
        for n, r in per.items():
            if "dense_ms" in r:
                f = lambda k: f"{r[k]:.3g}" if k in r else "–"  # noqa: E731
                lines.append(f"| `{n}` | {100 * r['sparsity']:.1f} % | {f('dense_ms')} | {f('direct_ms')} | "
                             f"{f('csr_ms')} | {r['impl']} | {', '.join(r.get('fused', [])) or '–'} |")  # fmt: skip
    split = res.get("bops_split")
    if split:
        lines += ["", "## StereoNet BOPs at 500x741: weight x activation vs activation x activation (cost model)", "",
                  "| model | weight BOPs | activation BOPs | activation share |", "|---|---:|---:|---:|"]  # fmt: skip
        for k, v in split.items():
            tot = v["weight_bops"] + v["act_bops"]
            lines.append(f"| {k} | {v['weight_bops']:.4g} | {v['act_bops']:.4g} | {100 * v['act_bops'] / tot:.1f} % |")
    path.write_text("\n".join(lines) + "\n")


def readme_section(res: dict[str, Any]) -> str:
    """README's Speed section: generated from ``speed.json`` (the prose around it is README's own)."""
    lines = [README_BEGIN,
             "<!-- generated by `python bench/speed.py --readme` from bench/results/speed.json; do not edit -->", "",
             f"`python bench/speed.py` — {THREADS} threads, torch {res['machine']['torch']}, interleaved rounds, "
             "medians [IQR]; **×** = speed-up over dense eager ([`bench/results/speed.md`](bench/results/speed.md)).", "",
             *table(res), "", *[f"- {t}" for t in targets(res)], README_END]  # fmt: skip
    return "\n".join(lines)


def write_readme(res: dict[str, Any], path: Path = ROOT / "README.md") -> None:
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{path}: no {README_BEGIN} ... {README_END} section to fill")
    new = re.sub(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), lambda _: readme_section(res), text,
                 flags=re.S)  # fmt: skip
    path.write_text(new)


#: glibc returns big blocks to the system and maps them afresh on every call, so each 24 MB activation of
#: StereoNet at 500x741 costs page faults: dense eager swung between ~94 and ~170 ms from run to run. These
#: keep freed memory in the process (the same for every runtime compared).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "100000000000",
              "MALLOC_TOP_PAD_": "1000000000"}  # fmt: skip


def main() -> None:
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):  # glibc reads them at start: re-exec
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--name", default="speed")
    ap.add_argument("--readme", action="store_true", help="only rewrite README's Speed section from the results")
    ap.add_argument("--only", default="", help="comma-separated model name prefixes (default: all)")
    args = ap.parse_args()
    out = ROOT / "bench" / "results"
    if args.readme:
        write_readme(json.loads((out / f"{args.name}.json").read_text()))
        return
    torch.set_num_threads(THREADS)
    _WAIT_BUDGET[0] = 300.0
    t0 = time.perf_counter()
    rounds, min_s = (3, 0.05) if args.quick else (7, 0.3)
    import onnxruntime

    from prunq.runtime import _direct

    kernel, why = _direct.available()
    res: dict[str, Any] = {"argv": sys.argv[1:], "models": {}, "direct_kernel": {"available": kernel, "why": why},
                           "machine": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                                       "platform": platform.platform(), "malloc": MALLOC_ENV}}  # fmt: skip
    only = [o for o in args.only.split(",") if o]
    for name, (model, inputs) in models(args.quick).items():
        if only and not any(name.startswith(o) for o in only):
            continue
        sparsities = SPARSITIES if not args.quick else (0.0, 0.95)
        res["models"][name] = run_model(name, model, inputs, sparsities, rounds, min_s, res)
        if name.startswith("stereo"):
            res["bops_split"] = bops_split(model, inputs)
    res["wall_s"] = time.perf_counter() - t0
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=2))
    write_md(res, out / f"{args.name}.md")
    if args.name == "speed" and not args.quick:
        write_readme(res)
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
