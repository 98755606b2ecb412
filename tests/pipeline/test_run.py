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


def _assert_on_grid(w: torch.Tensor, step: torch.Tensor, qmax: int, name: str) -> None:
    """``w == k * step`` exactly, with integers ``|k| <= qmax`` (no clamp before the comparison)."""
    s = step.reshape(-1, *([1] * (w.dim() - 1)))
    k = torch.round(w / s)
    assert torch.equal(k * s, w), f"{name}: off the grid"
    assert k.abs().max() <= qmax, f"{name}: integers out of range"


def test_pruned_weights_are_exactly_zero_and_on_the_grid(run):
    _, res = run
    for name, module, mask in M.masked_modules(res.model):
        w = module.weight.detach()
        assert (w[mask.mask == 0] == 0).all(), name
        _assert_on_grid(w, weight_quantizer(module).effective_step(), 7, name)  # 4-bit narrow range


def test_the_grid_test_can_fail():
    with pytest.raises(AssertionError, match="off the grid"):
        _assert_on_grid(torch.tensor([[0.5, 0.26]]), torch.tensor([0.25]), 7, "x")
    with pytest.raises(AssertionError, match="out of range"):
        _assert_on_grid(torch.tensor([[2.25]]), torch.tensor([0.25]), 7, "x")


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
        _assert_on_grid(module.weight.detach(), weight_quantizer(module).effective_step(), 7, name)
    manifest = json.loads((tmp_path / "r" / "model.json").read_text())
    assert manifest["format"] == 2 and manifest["model"]["origin"] == "zoo"
    assert [t["op"] for t in manifest["transforms"]] == ["mask", "fold_bn", "quantize"]


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
    ops = {t["op"]: t for t in res.manifest["transforms"]}
    assert ops["mask"]["layers"] and ops["quantize"]["layers"]["classifier.fc1"]["weight"]["bits"] == 4
    assert res.manifest["model"] == {"origin": "user", "class": "DigitsCNN"}


def test_compressed_sparsity_counts_prunable_layers_only():
    """Bug: compressed.sparsity counted layers excluded from pruning while pruned.sparsity did not."""
    task = get_task("digits")
    torch.manual_seed(2)
    model = task.build_model("digits_cnn", width=0.25)
    recipe = {"prune": {"sparsity": 0.9, "schedule": "one_shot", "mode": "hard", "criterion": "magnitude",
                        "exclude": ["classifier.fc1"], "finetune": {"steps": 0}},
              "quant": {"enabled": False}}  # fmt: skip
    m = prunq.compress(model, task, recipe, quiet=True).metrics
    assert m["pruned"]["sparsity"] == pytest.approx(m["compressed"]["sparsity"])
    assert m["compressed"]["sparsity"] == pytest.approx(0.9, abs=0.005)


def test_convert_bakes_a_plain_model_with_the_same_outputs(run):
    _, res = run
    model = copy.deepcopy(res.model).eval()
    x = get_task("digits").example_inputs()[0].repeat(4, 1, 1, 1)
    ref = model(x)
    prunq.convert(model)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert torch.allclose(model(x), ref, atol=1e-5)
    records = prunq.layer_records(model)
    assert all(r.weight_bits == 4 for r in records)
    for r in records:  # the bits and steps are in the state dict; weights are integer x step
        assert f"{r.name}.weight_bits" in model.state_dict()
        _assert_on_grid(r.weight, r.weight_q.step, 7, r.name)


def test_convert_on_a_copy_leaves_the_original_intact(run):
    """Bug: convert() on a deepcopy broke the original (the parametrized class was shared)."""
    _, res = run
    copy_ = copy.deepcopy(res.model)
    prunq.convert(copy_)
    x = get_task("digits").example_inputs()[0]
    res.model.eval()
    assert torch.allclose(res.model(x), copy_.eval()(x), atol=1e-5)
    assert any(hasattr(m, "parametrizations") for m in res.model.modules())


def test_save_and_load_a_converted_model(run, tmp_path):
    _, res = run
    model = prunq.convert(copy.deepcopy(res.model))
    prunq.save((model, res.manifest), tmp_path / "c")
    ops = [t["op"] for t in json.loads((tmp_path / "c" / "model.json").read_text())["transforms"]]
    assert ops[-1] == "convert"
    loaded = prunq.load(tmp_path / "c")
    task = get_task("digits")
    assert task.evaluate(loaded)["metric"] == task.evaluate(model)["metric"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


class _SeqTask(prunq.Task):
    """A tiny sequence-classification task (random features; the label is the sign of feature 0's mean)."""

    name = "seq"
    metric_name = "top1"
    higher_is_better = True

    def __init__(self, batch_first: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.batch_first = batch_first
        self.example_batch_size = None if batch_first else 1  # sequence-first: (T, B, D), dim 0 is not B
        self.x = torch.randn(96, 6, 8, generator=g)
        self.y = (self.x[:, :, 0].mean(1) > 0).long()

    def _in(self, x):
        return x if self.batch_first else x.transpose(0, 1)

    def build_model(self, name=None, **kw):
        raise NotImplementedError

    def train_batches(self, batch_size, seed):
        order = torch.randperm(64, generator=torch.Generator().manual_seed(seed))
        for i in range(0, 64, batch_size):
            idx = order[i : i + batch_size]
            yield self.x[idx], self.y[idx]

    def loss(self, model, batch):
        return torch.nn.functional.cross_entropy(model(self._in(batch[0])), batch[1])

    def evaluate(self, model):
        with torch.no_grad():
            was = model.training
            model.eval()
            acc = float((model(self._in(self.x[64:])).argmax(1) == self.y[64:]).float().mean())
            model.train(was)
        return {"metric": acc}

    def example_inputs(self):
        return (self._in(self.x[:1]),)


class _SeqNet(torch.nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = self.encoder(x)
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_transformer_encoder_is_pruned_quantized_and_counted(batch_first, tmp_path):
    """Bug: MultiheadAttention's projections were never pruned, quantized or counted, and calibration failed
    (out_proj.forward is never called). Both batch layouts, through compress, save and load."""
    torch.manual_seed(0)
    task = _SeqTask(batch_first)
    model = _SeqNet(batch_first)
    recipe = {"prune": {"sparsity": 0.5, "criterion": "magnitude", "schedule": "one_shot", "mode": "hard",
                        "finetune": {"steps": 4}}, "quant": {"calib_batches": 2, "finetune": {"steps": 2}},
              "task": {"batch_size": 16}}  # fmt: skip
    res = prunq.compress(model, task, recipe, quiet=True)
    layers = {lc["name"]: lc for lc in res.metrics["layers"]}
    for i in (0, 1):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            lc = layers[f"encoder.layers.{i}.self_attn.{proj}"]
            assert lc["weight_bits"] == 4 and lc["act_bits"] == 8, (i, proj)
            assert lc["macs"] == 6 * 8 * 8  # per example: T x out x in, whatever the layout
            assert lc["pruned"] and lc["nonzeros"] < lc["params"]
    assert res.metrics["dense"]["macs"] == 2 * (4 * 6 * 64 + 2 * 6 * 8 * 16) + 8 * 2
    assert res.manifest["transforms"][0]["op"] == "decompose_attention"
    prunq.save(res, tmp_path / "seq")
    loaded = prunq.load(tmp_path / "seq", model=_SeqNet(batch_first))
    assert task.evaluate(loaded)["metric"] == res.metrics["compressed"]["metric"]


def test_eval_every_without_a_validation_split_fails_before_training():
    class NoVal(_SeqTask):  # a task without a selection split
        validate = prunq.Task.validate

    with pytest.raises(prunq.PrunqError, match="eval_every: task 'seq' has no validation split"):
        prunq.compress(_SeqNet(True), NoVal(True), {"eval_every": 5}, quiet=True)


def test_two_methods_of_one_stage_name_add_up_their_time():
    from prunq.pipeline.run import StageResult, _timing

    t = _timing([StageResult("prune", 0.0, seconds=1.5), StageResult("prune", 0.0, seconds=0.5)], 3.0)
    assert t["prune_s"] == 2.0 and t["total_s"] == 3.0
