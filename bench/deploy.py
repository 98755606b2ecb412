"""Deployable files, measured (issue 11): bytes on disk, ONNX Runtime latency, and agreement with prunq. Not a test.

    .venv/bin/python bench/deploy.py              # about 10 min on 2 cores (needs the export extra; hls4ml for --hls)
    .venv/bin/python bench/deploy.py --quick      # a smoke run (fewer rounds, smaller budgets)

Three models, each compressed by prunq at 95 % (digits: the demo's 98 %) with 4-bit weights and 8-bit
activations:

* **digits CNN**: ``recipes/digits.yaml`` end to end (dense training included), real data;
* **ResNet-20** (CIFAR-style, 32x32): no CIFAR-10 on this machine, so *random* weights, magnitude-pruned,
  calibrated on random inputs — for bytes and latency only (accuracy is meaningless here);
* **StereoNet** from the committed dense checkpoint (``bench/assets/stereo_dense.safetensors``), pruned
  (Taylor, one shot) and quantized (calibration only) — latency at the Middlebury size 500x741, EPE of
  ONNX Runtime against prunq on the real motorcycle pair and the synthetic validation scenes.

For each: the bytes of the dense fp32 safetensors file, prunq's run files (``model.safetensors`` +
``model.json``), the packed file, QONNX, ONNX int8 QDQ and ONNX with INT4 weight initializers; ORT latency of
the fp32 ONNX graph, the int8 QDQ graph and the INT4 graph (and prunq's converted model in torch) at batch 1
and 64 (StereoNet: 1 and 4 at 500x741 — a batch of 64 such pairs is 280 MB of input), 2 threads,
interleaved rounds (bench/quant_speed.py's timer), medians with interquartile ranges. Agreement: qonnx's
executor and ORT on the digits test split (top-1 against prunq's), ORT on the stereo scenes (EPE against
prunq's). With ``--hls``: hls4ml's figures for the digits CNN at dense, 95, 98 and 99 % w4a8 (power-of-two
steps), its C simulation against qonnx.

Writes ``bench/results/deploy.json`` and ``deploy.md`` (the README's Deploy figures come from there).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_speed import _WAIT_BUDGET, _quartiles, interleaved  # noqa: E402

import prunq  # noqa: E402
from prunq.export.onnx_qdq import to_onnx_fp32, to_onnx_qdq  # noqa: E402
from prunq.export.qonnx import to_qonnx  # noqa: E402
from prunq.pipeline.export import export_bytes  # noqa: E402
from prunq.pipeline.io import save_model, tensor_bytes  # noqa: E402
from prunq.pipeline.recipes import load_recipe  # noqa: E402
from prunq.pipeline.run import compress  # noqa: E402
from prunq.pipeline.runs import compress_recipe, dense_model, make_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2


def _ort_session(proto: Any) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feed(sess: Any, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    return {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}


def _fused(proto: Any) -> dict[str, int]:
    """Op counts of the graph ORT runs after its optimizations."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        g = onnx.load(opts.optimized_model_filepath)
    counts: dict[str, int] = {}
    for n in g.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def file_sizes(dense: torch.nn.Module, result: Any, example: tuple) -> dict[str, int]:
    """Bytes of each file for one compressed model (``result``: a CompressResult)."""
    converted = prunq.convert(copy.deepcopy(result.model)).eval()
    with tempfile.TemporaryDirectory() as d:
        save_model(Path(d), result.model, result.manifest)
        run_bytes = sum(p.stat().st_size for p in Path(d).iterdir())
    return {
        "dense_fp32_safetensors": len(tensor_bytes(dense.state_dict())),
        "prunq_run_files": run_bytes,
        "packed": len(export_bytes(result)),
        "qonnx": len(to_qonnx(converted, example).SerializeToString()),
        "onnx_int8_qdq": len(to_onnx_qdq(converted, example).SerializeToString()),
        "onnx_int4": len(to_onnx_qdq(converted, example, int4=True).SerializeToString()),
        "onnx_fp32": len(to_onnx_fp32(converted, example).SerializeToString()),
        "cost_model_bytes": result.metrics["compressed"]["memory_bits"] / 8,
    }


def latencies(converted: torch.nn.Module, inputs: tuple, rounds: int, min_s: float) -> dict[str, Any]:
    """ORT fp32 / int8 QDQ / INT4 and prunq's converted model in torch, interleaved, on ``inputs``."""
    sessions = {
        "ort_fp32": _ort_session(to_onnx_fp32(converted, inputs)),
        "ort_int8_qdq": _ort_session(to_onnx_qdq(converted, inputs)),
        "ort_int4": _ort_session(to_onnx_qdq(converted, inputs, int4=True)),
    }
    fns = {k: (lambda s=s: s.run(None, _feed(s, inputs))) for k, s in sessions.items()}

    def torch_fn() -> None:
        with torch.no_grad():
            converted(*inputs)

    fns["prunq_torch"] = torch_fn
    res = interleaved(fns, rounds=rounds, min_s=min_s, max_foreign=0.25, max_wait_s=20.0)
    out: dict[str, Any] = {"clean": res["clean"], "rounds_kept": len(res["kept"]), "rounds": rounds}
    kept = res["kept"]
    for k, v in res["times"].items():
        q1, med, q3 = _quartiles([v[i] for i in kept])
        out[k] = {"median_ms": 1e3 * med, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3}
    base = res["times"]["ort_fp32"]
    for k in ("ort_int8_qdq", "ort_int4", "prunq_torch"):
        ratios = [base[i] / res["times"][k][i] for i in kept]
        q1, med, q3 = _quartiles(ratios)
        out[k]["speedup_vs_ort_fp32"] = {"median": med, "q1": q1, "q3": q3}
    return out


# -- the three models ---------------------------------------------------------------------------------
def digits(quick: bool) -> dict[str, Any]:
    recipe = load_recipe(ROOT / "recipes" / "digits.yaml")
    if quick:
        recipe = recipe.with_(**{"dense.steps": 200, "prune.finetune.steps": 100, "quant.finetune.steps": 30})
    t0 = time.perf_counter()
    result = compress_recipe(recipe, quiet=True)
    task = make_task(recipe)
    dense = task.build_model(recipe.model.name, **recipe.model.kwargs)
    dense.load_state_dict(result.dense_state)
    converted = prunq.convert(copy.deepcopy(result.model)).eval()
    x_test = torch.cat([x for x, _ in task.test_batches()])
    y_test = torch.cat([y for _, y in task.test_batches()])
    with torch.no_grad():
        ref = converted(x_test).numpy()
    # qonnx's executor, node by node, and ORT's fused kernels, on the whole test split
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    w = ModelWrapper(to_qonnx(converted, (x_test,)))
    q_out = execute_onnx(w, {w.graph.input[0].name: x_test.numpy()})[w.graph.output[0].name]
    sess = _ort_session(to_onnx_qdq(converted, (x_test,)))
    o_out = sess.run(None, _feed(sess, (x_test,)))[0]
    top = {name: int((out.argmax(1) == y_test.numpy()).sum()) for name, out in
           (("prunq", ref), ("qonnx", q_out), ("ort_int8_qdq", o_out))}  # fmt: skip
    agree = {
        "n_test": int(y_test.numel()), "correct": top,
        "qonnx_max_abs_diff": float(np.abs(q_out - ref).max()),
        "ort_predictions_differing": int((o_out.argmax(1) != ref.argmax(1)).sum()),
        "qonnx_predictions_differing": int((q_out.argmax(1) != ref.argmax(1)).sum()),
        "fused_ops": _fused(to_onnx_qdq(converted, (x_test[:1],))),
    }  # fmt: skip
    return {"model": "digits_cnn", "result": result, "dense": dense, "converted": converted,
            "example": (x_test[:1],), "batch": lambda b: (x_test[:b],), "agreement": agree,
            "compress_s": time.perf_counter() - t0}  # fmt: skip


def resnet20(quick: bool) -> dict[str, Any]:
    from prunq.prune.pruner import PruneConfig
    from prunq.quant import QuantConfig

    class _Random(prunq.Task):  # random CIFAR-shaped data: no CIFAR-10 on this machine
        name, metric_name = "random-cifar", "loss"
        higher_is_better = False

        def build_model(self, name, **kw):
            from prunq.tasks.classification.models import build

            return build(name, in_channels=3, num_classes=10, **kw)

        def train_batches(self, batch_size, seed):
            g = torch.Generator().manual_seed(seed)
            return [(torch.randn(batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
                    for _ in range(4)]  # fmt: skip

        def loss(self, model, batch):
            return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

        def evaluate(self, model):
            with torch.no_grad():
                return {"metric": float(self.loss(model, self.train_batches(64, 99)[0]))}

        def example_inputs(self):
            return (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)

    task = _Random()
    torch.manual_seed(0)
    dense = task.build_model("resnet20")
    recipe = {"methods": [
        PruneConfig(sparsity=0.95, criterion="magnitude", schedule="one_shot", finetune={"steps": 0}).model_dump(),
        QuantConfig(weight_bits=4, act_bits=8, calib_batches=2, finetune={"steps": 0}).model_dump(),
    ], "task": {"batch_size": 64}}  # fmt: skip
    t0 = time.perf_counter()
    result = compress(dense, task, recipe, quiet=True)
    converted = prunq.convert(copy.deepcopy(result.model)).eval()
    g = torch.Generator().manual_seed(2)
    return {"model": "resnet20 (random weights)", "result": result, "dense": dense, "converted": converted,
            "example": task.example_inputs(), "batch": lambda b: (torch.randn(b, 3, 32, 32, generator=g),),
            "agreement": {"fused_ops": _fused(to_onnx_qdq(converted, task.example_inputs()))},
            "compress_s": time.perf_counter() - t0}  # fmt: skip


def stereo(quick: bool) -> dict[str, Any]:
    from prunq.tasks.stereo.metrics import StereoMeter
    from prunq.tasks.stereo.task import _motorcycle

    recipe = load_recipe(ROOT / "recipes" / "stereo.yaml").with_(**{
        "model.checkpoint": str(ROOT / "bench" / "assets" / "stereo_dense.safetensors"), "dense.steps": 0,
        "eval_every": 0, "prune.finetune.steps": 0, "quant.finetune.steps": 0,
        "prune.score_batches": 4 if quick else 16, "quant.calib_batches": 4 if quick else 16,
        "task.options.n_val": 4 if quick else 32,
    })  # fmt: skip
    task = make_task(recipe)
    dense, _, _ = dense_model(recipe, task, quiet=True)
    t0 = time.perf_counter()
    result = compress(copy.deepcopy(dense), task, recipe, quiet=True)
    converted = prunq.convert(copy.deepcopy(result.model)).eval()
    left, right, gt = _motorcycle()  # (1, 3, H, W) x 2, (1, H, W)
    pair = (left, right)
    with torch.no_grad():
        ref = converted(*pair)
    sess = _ort_session(to_onnx_qdq(converted, pair))
    ort_out = torch.from_numpy(sess.run(None, _feed(sess, pair))[0])
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    w = ModelWrapper(to_qonnx(converted, pair))  # qonnx's executor, node by node, at 500x741
    q_out = torch.from_numpy(execute_onnx(w, {i.name: x.numpy() for i, x in zip(w.graph.input, pair)})[w.graph.output[0].name])
    meters = {}
    for name, pred in (("prunq", ref), ("ort_int8_qdq", ort_out), ("qonnx", q_out)):
        m = StereoMeter()
        m.update(pred.float(), gt)
        meters[name] = m.compute()["epe"]
    val_in = next(task.val_batches())
    vin = (val_in[0], val_in[1])
    vsess = _ort_session(to_onnx_qdq(converted, vin))
    val = {}
    with torch.no_grad():
        vref = converted(*vin)
    for name, pred in (("prunq", vref), ("ort_int8_qdq", torch.from_numpy(vsess.run(None, _feed(vsess, vin))[0]))):
        m = StereoMeter()
        m.update(pred.float(), val_in[2])
        val[name] = m.compute()["epe"]
    agree = {"middlebury_epe": meters, "val_epe": val, "max_abs_diff_px": float((ort_out - ref).abs().max()),
             "qonnx_max_abs_diff_px": float((q_out.reshape(ref.shape) - ref).abs().max()),
             "fused_ops": _fused(to_onnx_qdq(converted, pair))}  # fmt: skip
    return {"model": "stereo_net", "result": result, "dense": dense, "converted": converted, "example": pair,
            "batch": lambda b: (left.expand(b, -1, -1, -1).contiguous(), right.expand(b, -1, -1, -1).contiguous()),
            "agreement": agree, "compress_s": time.perf_counter() - t0}  # fmt: skip


# -- hls4ml -------------------------------------------------------------------------------------------
def hls_figures(quick: bool) -> dict[str, Any]:
    """hls4ml's own figures for the digits CNN at dense and 95/98/99 % w4a8 (power-of-two steps)."""
    from prunq.export.hls import to_hls

    recipe = load_recipe(ROOT / "recipes" / "digits.yaml").with_(**{"quant.power_of_two": True})
    if quick:
        recipe = recipe.with_(**{"dense.steps": 200, "prune.finetune.steps": 100, "quant.finetune.steps": 30})
    task = make_task(recipe)
    dense, _, _ = dense_model(recipe, task, quiet=True)
    x_test = torch.cat([x for x, _ in task.test_batches()])
    out: dict[str, Any] = {}
    for s in (0.0, 0.95, 0.98, 0.99):  # 0: the dense model through the same quantize method (w4a8, no mask)
        if s:
            r = recipe.with_(**{"prune.sparsity": s})
        else:
            r = recipe.model_copy(update={"methods": [m for m in recipe.methods if m.kind == "quantize"]})
        result = compress(copy.deepcopy(dense), task, r, quiet=True)
        converted = prunq.convert(copy.deepcopy(result.model)).eval()
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            hls = to_hls(converted, (x_test[:1],), Path(d) / "hls")
            build_s = time.perf_counter() - t0
            sim = hls.predict(x_test.numpy())
        with torch.no_grad():
            ref = converted(x_test).numpy()
        out[f"{s:g}"] = {
            "sparsity": result.metrics["compressed"]["sparsity"], "top1_prunq": result.metrics["compressed"]["metric"],
            "bops": result.metrics["compressed"]["bops"], "hls": hls.totals, "build_s": build_s,
            "hls_layers": [{k: v for k, v in lay.items() if k in ("name", "n_weights", "n_zeros", "multiplier_limit",
                                                                   "weight_precision")} for lay in hls.layers],
            "csim_vs_prunq_max_abs_diff": float(np.abs(sim.reshape(ref.shape) - ref).max()),
            "csim_predictions_differing": int((sim.reshape(ref.shape).argmax(1) != ref.argmax(1)).sum()),
        }  # fmt: skip
    return out


# -- report -------------------------------------------------------------------------------------------
def _kb(b: float) -> str:
    return f"{b / 1024:,.1f} KiB" if b >= 1024 else f"{b:,.0f} B"


def write_md(res: dict[str, Any], path: Path) -> None:
    lines = ["# Deployable files: bytes, ONNX Runtime latency, agreement", "",
             f"`{' '.join(['python', 'bench/deploy.py', *res['argv']])}` — torch {res['machine']['torch']}, "
             f"onnxruntime {res['machine']['onnxruntime']}, {THREADS} threads, {res['machine']['platform']}; "
             f"{res['wall_s'] / 60:.1f} min.", "",
             "## Files (bytes on disk)", "",
             "| model | dense fp32 safetensors | prunq run files | **packed** | cost model | QONNX | ONNX int8 QDQ | ONNX INT4 | ONNX fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for m in res["models"]:
        f = m["files"]
        d = f["dense_fp32_safetensors"]
        lines.append(f"| {m['model']} | {_kb(d)} | {_kb(f['prunq_run_files'])} | **{_kb(f['packed'])}** "
                     f"({100 * f['packed'] / d:.2f} %) | {_kb(f['cost_model_bytes'])} | {_kb(f['qonnx'])} | "
                     f"{_kb(f['onnx_int8_qdq'])} | {_kb(f['onnx_int4'])} | {_kb(f['onnx_fp32'])} |")  # fmt: skip
    lines += ["", "Packed / cost model: " + ", ".join(
        f"{m['model']} {m['files']['packed'] / m['files']['cost_model_bytes']:.3f}×" for m in res["models"]) + ".", "",
        "## ONNX Runtime latency (median ms [IQR]; speed-up vs ORT fp32, median of per-round ratios)", "",
        "| model | batch | ORT fp32 | ORT int8 QDQ | ORT INT4 | prunq converted (torch) | rounds kept |",
        "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for m in res["models"]:
        for b, lat in m["latency"].items():
            def cell(k: str, lat: dict = lat) -> str:
                v = lat[k]
                s = f"{v['median_ms']:.3g} [{v['q1_ms']:.3g}–{v['q3_ms']:.3g}]"
                if "speedup_vs_ort_fp32" in v:
                    s += f" ({v['speedup_vs_ort_fp32']['median']:.2f}×)"
                return s

            lines.append(f"| {m['model']} | {b} | {cell('ort_fp32')} | {cell('ort_int8_qdq')} | {cell('ort_int4')} | "
                         f"{cell('prunq_torch')} | {lat['rounds_kept']}/{lat['rounds']}{'' if lat['clean'] else ' (noisy)'} |")  # fmt: skip
    lines += ["", "## Agreement with prunq", ""]
    for m in res["models"]:
        a = {k: v for k, v in m["agreement"].items() if k != "fused_ops"}
        fused = m["agreement"].get("fused_ops", {})
        keep = {k: v for k, v in fused.items() if k in ("QLinearConv", "QGemm", "QLinearMatMul", "Conv", "FusedConv",
                                                        "ConvTranspose", "DequantizeLinear")}  # fmt: skip
        lines.append(f"- **{m['model']}**: {json.dumps(a)}; ops ORT runs for the int8 graph: {json.dumps(keep)}")
    if res.get("hls"):
        lines += ["", "## hls4ml (digits CNN, w4a8, power-of-two steps; Latency strategy, io_parallel; C simulation with g++)", "",
                  "| model | top-1 (prunq) | prunq BOPs | hls4ml zero weights | hls4ml multipliers | C-sim vs prunq | build + compile |",
                  "|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
        dense_mult = None
        for k, h in res["hls"].items():
            s = h["hls"]
            mult = s.get("multiplier_limit")
            dense_mult = dense_mult or mult
            share = f" ({100 * mult / dense_mult:.1f} %)" if mult is not None and dense_mult else ""
            what = f"{100 * h['sparsity']:.1f} %" if k != "0" else f"dense, no mask ({100 * h['sparsity']:.1f} % zeros from 4-bit rounding)"
            lines.append(f"| {what} | {100 * h['top1_prunq']:.1f} % | {h['bops']:.3g} | "
                         f"{s.get('n_zeros'):,} of {s.get('n_weights'):,} | {mult:,}{share} | {h['csim_predictions_differing']} predictions differ, "
                         f"max diff {h['csim_vs_prunq_max_abs_diff']:.2g} | {h['build_s']:.0f} s |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hls", action="store_true", help="also hls4ml's figures (digits at dense/95/98/99 %%)")
    ap.add_argument("--only", nargs="*", default=["digits", "resnet20", "stereo"])
    ap.add_argument("--name", default="deploy")
    ap.add_argument("--render", action="store_true", help="only rewrite <name>.md from <name>.json")
    args = ap.parse_args()
    if args.render:
        out = ROOT / "bench" / "results"
        write_md(json.loads((out / f"{args.name}.json").read_text()), out / f"{args.name}.md")
        return
    torch.set_num_threads(THREADS)
    _WAIT_BUDGET[0] = 300.0
    t0 = time.perf_counter()
    rounds = 3 if args.quick else 9
    models = []
    builders = {"digits": digits, "resnet20": resnet20, "stereo": stereo}
    for name in args.only:
        m = builders[name](args.quick)
        print(f"{name}: compressed in {m['compress_s']:.0f} s", flush=True)
        m["files"] = file_sizes(m["dense"], m["result"], m["example"])
        batches = (1, 4) if name == "stereo" else (1, 64)
        m["latency"] = {b: latencies(m["converted"], m["batch"](b), rounds, 0.05 if args.quick else 0.2) for b in batches}
        print(json.dumps({k: m[k] for k in ("files", "agreement")}, default=str)[:2000], flush=True)
        models.append({k: m[k] for k in ("model", "files", "latency", "agreement", "compress_s")})
    import onnxruntime

    res: dict[str, Any] = {"argv": sys.argv[1:], "models": models,
                           "machine": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                                       "platform": platform.platform(), "threads": THREADS}}  # fmt: skip
    if args.hls:
        res["hls"] = hls_figures(args.quick)
    res["wall_s"] = time.perf_counter() - t0
    out = ROOT / "bench" / "results"
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=2, default=str))
    write_md(res, out / f"{args.name}.md")
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
