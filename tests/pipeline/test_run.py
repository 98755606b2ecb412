"""`compress` end to end on real digits with a small budget, and `prunq.load` reproducing it."""

import copy
import json

import pytest
import torch

import prunq
from prunq.prune import masks as M
from prunq.quant.weight import weight_quantizer
from prunq.pipeline.recipes import parse_recipe
from prunq.pipeline.runs import compress_recipe, write_run
from prunq.tasks import get_task

from tests._tiny import TINY

REQUIRED = {
    "dense": {"metric", "params", "macs", "bops", "memory_bits"},
    "pruned": {"metric", "sparsity"},
    "compressed": {"metric", "sparsity", "weight_bits", "act_bits", "bops", "memory_bits"},
}


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    recipe = parse_recipe(TINY)
    return recipe, compress_recipe(recipe, quiet=True)


def test_metrics_follow_the_contract(run):
    _, res = run
    m = res.metrics
    assert m["task"] == "digits" and m["metric_name"] == "top1" and m["higher_is_better"] is True
    for section, keys in REQUIRED.items():
        assert keys <= set(m[section]), section
    for lay in m["layers"]:
        assert {"name", "params", "nonzeros", "macs", "weight_bits", "act_bits"} <= set(lay)
    assert m["compressed"]["weight_bits"] == 4 and m["compressed"]["act_bits"] == 8
    assert m["compressed"]["sparsity"] >= 0.9 - 1e-3
    assert 0 < m["memory_ratio"] < 0.1 and 0 < m["bops_ratio"] < 0.01
    # BOPs: sum over layers of MACs * density * 4 * 8, against MACs * 32 * 32
    bops = sum(lay["macs"] * lay["nonzeros"] / lay["params"] * 32 for lay in m["layers"])
    assert m["compressed"]["bops"] == pytest.approx(bops)
    assert m["bops_ratio"] == pytest.approx(bops / (m["dense"]["macs"] * 1024))
    json.dumps(m, allow_nan=False)
    assert m["dense"]["metric"] > 0.85  # a real model on real data, even at this tiny budget


def test_pruned_weights_are_exactly_zero_and_on_the_grid(run):
    _, res = run
    for name, module, mask in M.masked_modules(res.model):
        w = module.weight.detach()
        assert (w[mask.mask == 0] == 0).all(), name
        wq = weight_quantizer(module)
        levels = wq.int_weight(w).float()
        assert levels.abs().max() <= 7  # 4-bit narrow range
        assert (levels[mask.mask == 0] == 0).all()


def test_load_reproduces_the_compressed_metric(run, tmp_path):
    recipe, res = run
    write_run(tmp_path / "r", recipe, res, render=False)
    model = prunq.load(tmp_path / "r")
    assert not model.training
    task = get_task("digits")
    assert task.evaluate(model)["metric"] == res.metrics["compressed"]["metric"]
    for (name, module, mask), (_, ref, _) in zip(M.masked_modules(model), M.masked_modules(res.model)):
        assert torch.equal(module.weight, ref.weight), name
        assert (module.weight[mask.mask == 0] == 0).all()


def test_api_compress_on_a_user_model_keeps_the_input_untouched():
    task = get_task("digits")
    torch.manual_seed(1)
    model = task.build_model("digits_cnn", width=0.25)
    before = copy.deepcopy(model.state_dict())
    recipe = {"prune": {"sparsity": 0.8, "schedule": "one_shot", "mode": "hard", "criterion": "magnitude",
                        "finetune": {"steps": 5}}, "quant": {"finetune": {"steps": 3}, "calib_batches": 1}}  # fmt: skip
    res = prunq.compress(model, task, recipe, quiet=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert res.metrics["pruned"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert res.manifest["masked"] and res.manifest["quant"]["weight_bits"] == 4


def test_convert_bakes_a_plain_model_with_the_same_outputs(run):
    _, res = run
    model = copy.deepcopy(res.model).eval()
    x = get_task("digits").example_inputs()[0].repeat(4, 1, 1, 1)
    ref = model(x)
    prunq.convert(model)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert torch.allclose(model(x), ref, atol=1e-5)
    info = prunq.quant.layer_quant(model)
    assert all(v["weight_bits"] == 4 for v in info.values())
