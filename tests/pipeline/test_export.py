"""prunq.export / prunq export: a run's packed file, written atomically and read back bit for bit."""

from __future__ import annotations

import pytest
import torch

import prunq
from prunq.core.errors import PrunqError
from prunq.pipeline.export import export, export_bytes, load_packed
from prunq.pipeline.recipes import parse_recipe
from prunq.pipeline.runs import compress_recipe, write_run

from tests._tiny import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = {**TINY, "dense": {**TINY["dense"], "steps": 30}, "prune": {**TINY["prune"], "finetune": {"steps": 10}},
            "quant": {**TINY["quant"], "finetune": {"steps": 3}}}  # fmt: skip
    recipe = parse_recipe(data)
    result = compress_recipe(recipe, quiet=True)
    d = tmp_path_factory.mktemp("export") / "run"
    write_run(d, recipe, result, render=False)
    return d, result


def test_a_run_exported_packed_loads_back_as_its_converted_model(run, tmp_path):
    d, result = run
    out = export(d, tmp_path / "m.packed")
    assert out.read_bytes() == export_bytes(result)  # from the directory or from the result: the same bytes
    a, b = prunq.load(d, convert=True).state_dict(), load_packed(out).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    layers = result.metrics["layers"]
    header = 9 * len(layers)  # 72 bits per layer
    assert out.stat().st_size >= sum(lay["memory_bits"] for lay in layers) // 8 + header


def test_unknown_format_and_a_user_model_without_model_are_one_line_errors(run, tmp_path):
    d, result = run
    with pytest.raises(PrunqError, match=r"--format: unknown format 'onnx9'"):
        export(d, tmp_path / "x", "onnx9")
    assert not (tmp_path / "x").exists()
    user = (result.model, {**result.manifest, "model": {"origin": "user", "class": "Net"}})
    path = export(user, tmp_path / "u.packed")
    with pytest.raises(PrunqError, match=r"holds your own model \(Net\); pass a fresh instance"):
        load_packed(path)
    model = prunq.get_task("digits").build_model("digits_cnn", width=0.5)
    assert torch.equal(load_packed(path, model=model).classifier.fc2.weight,
                       prunq.load(d, convert=True).classifier.fc2.weight)  # fmt: skip


def test_prunq_load_reads_a_packed_file_like_a_run(run):
    d, _ = run
    a, b = prunq.load(d / "model.packed").state_dict(), prunq.load(d, convert=True).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_onnx_formats_from_a_run_run_in_onnx_runtime_and_qonnx_like_prunq(run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("qonnx")
    import numpy as np
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    d, _ = run
    model = prunq.load(d, convert=True)
    task = prunq.get_task("digits")
    x = next(task.test_batches(8))[0]
    with torch.no_grad():
        want = model(x).numpy()
    sizes = {}
    for fmt in ("qonnx", "onnx", "onnx-int4", "onnx-fp32"):
        path = export(d, tmp_path / f"m.{fmt}.onnx", fmt, example_inputs=(x,))
        sizes[fmt] = path.stat().st_size
        if fmt == "qonnx":
            w = ModelWrapper(str(path))
            got = execute_onnx(w, {w.graph.input[0].name: x.numpy()})[w.graph.output[0].name]
            assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
        else:
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            if fmt == "onnx-fp32":
                assert got.shape == want.shape  # quantizers dropped: a baseline, not the compressed model
            else:
                assert (got.argmax(1) == want.argmax(1)).all()
    assert sizes["onnx-int4"] < sizes["onnx"] < sizes["onnx-fp32"]
    with pytest.raises(PrunqError, match="needs example_inputs"):
        export_bytes(_result_tuple(d), "onnx")


def _result_tuple(d):
    from prunq.pipeline.io import read_manifest

    return prunq.load(d, convert=True), read_manifest(d)


def test_hls4ml_projects_need_power_of_two_steps_and_are_written_as_a_directory(run, tmp_path):
    pytest.importorskip("hls4ml")
    import json

    from torch import nn

    from prunq.pipeline.export import export_hls
    from prunq.quant import QuantConfig, calibrate, convert, prepare

    d, _ = run
    with pytest.raises(PrunqError, match=r"non-power-of-two .*quant\.power_of_two: true"):
        export_hls(d, tmp_path / "hls")
    assert not (tmp_path / "hls").exists()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    prepare(net, QuantConfig(weight_bits=4, act_bits=8, power_of_two=True))
    x = torch.randn(4, 6)
    calibrate(net, [x])
    out = export_hls((convert(net), {"model": {"origin": "user"}, "transforms": []}), tmp_path / "hls", (x[:1],))
    figures = json.loads((out / "prunq_hls.json").read_text())
    assert figures["totals"]["n_weights"] == 6 * 5 + 5 * 3
    assert (out / "project").is_dir() and not list(tmp_path.glob(".hls.tmp-*"))


def test_a_channel_pruned_run_exports_a_smaller_model_with_the_same_outputs(tmp_path):
    """Issue 12: --remove-channels slices the channels pruning emptied; every format sees the smaller model."""
    data = {**TINY, "dense": {**TINY["dense"], "steps": 30},
            "prune": {**TINY["prune"], "sparsity": 0.6, "granularity": "channel", "finetune": {"steps": 10}},
            "quant": {**TINY["quant"], "finetune": {"steps": 3}}}  # fmt: skip
    recipe = parse_recipe(data)
    result = compress_recipe(recipe, quiet=True)
    d = tmp_path / "run"
    write_run(d, recipe, result, render=False)
    full = export(d, tmp_path / "full.packed")
    small = export(d, tmp_path / "small.packed", remove_channels=True)
    assert small.stat().st_size < full.stat().st_size
    a, b = prunq.load(full), prunq.load(small)
    fewer = [n for n, m in b.named_modules() if hasattr(m, "weight") and m.weight.numel() < a.get_submodule(n).weight.numel()]
    assert fewer  # some layer lost channels
    x = next(prunq.get_task("digits").test_batches(32))[0]
    with torch.no_grad():
        want, got = a(x), b(x)
    assert float((want - got).abs().max()) <= 1e-4 * float(want.abs().max())  # a quantized act may round differently
    assert (want.argmax(1) == got.argmax(1)).float().mean() >= 0.97
    with pytest.raises(PrunqError, match="--remove-channels needs example_inputs"):
        export(result, tmp_path / "x.packed", remove_channels=True)
