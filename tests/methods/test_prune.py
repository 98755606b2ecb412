"""The ``prune`` method (prunq.methods.prune) through the one runner on digits, and its ``mask`` transform
replayed by name. An untrained, quarter-width DigitsCNN keeps every test well under a second."""

from __future__ import annotations

import pytest
import torch

from prunq.core.errors import PrunqError
from prunq.core.manifest import replay
from prunq.core.method import RunContext
from prunq.methods.prune import PruneMethod
from prunq.pipeline.run import run_methods
from prunq.prune import masks as M
from prunq.prune.pruner import PruneConfig
from prunq.tasks.classification.digits import DigitsTask

CONVS = ["features.conv1", "features.conv2", "features.conv3"]
ONE_SHOT = dict(criterion="magnitude", schedule="one_shot", mode="hard", score_batches=0, finetune={"steps": 0})


@pytest.fixture(scope="module")
def digits() -> DigitsTask:
    return DigitsTask()


def _model(task: DigitsTask, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return task.build_model("digits_cnn", width=0.25)


def test_one_shot_prune_reaches_the_target_and_records_every_masked_layer(digits):
    model = _model(digits)
    history: list[dict] = []
    cfg = PruneConfig(sparsity=0.7, exclude=("classifier.fc2",), **ONE_SHOT)
    (stage,) = run_methods(model, digits, [cfg], seed=0, batch_size=8, history=history)
    masked = [name for name, _, _ in M.masked_modules(model)]
    assert masked == [*CONVS, "classifier.fc1"]  # every prunable layer, the excluded one left alone
    # sparsity over the prunable weights: pruned / (72 + 1152 + 4608 + 4096)
    kept = sum(int(m.mask.sum()) for _, _, m in M.masked_modules(model))
    assert stage.sparsity == pytest.approx(1 - kept / (72 + 1152 + 4608 + 4096))
    assert stage.sparsity == pytest.approx(0.7, abs=0.005)
    assert (stage.name, stage.kind) == ("prune", "prune")
    assert [t.to_dict() for t in stage.transforms] == [{"op": "mask", "layers": masked}]
    assert stage.metric == digits.evaluate(model)["metric"]
    assert history == [{"stage": "prune", "step": 0, "metric": stage.metric, "sparsity": stage.sparsity}]
    for name, module, mask in M.masked_modules(model):  # frozen: hard masks, pruned shadows exactly zero
        assert not mask.soft and (M.original(module)[mask.mask == 0] == 0).all(), name


def test_gradual_prune_logs_its_cuts_and_the_validation_metric(digits):
    model = _model(digits, seed=1)
    history: list[dict] = []
    cfg = PruneConfig(sparsity=0.6, criterion="magnitude", schedule="gradual", begin=0.0, end=1.0, frequency=2,
                      score_batches=0, finetune={"steps": 6, "lr": 1e-3})  # fmt: skip
    (stage,) = run_methods(model, digits, [cfg], seed=0, batch_size=8, history=history, eval_every=3)
    during, final = history[:-1], history[-1]
    assert all("loss" in h for h in during) and "loss" not in final
    # updates every 2 steps: step 0 (target 0: no cut), 2 and 4 cut; the schedule's last update (step 6) lies
    # past the 6 steps of fine-tuning, so finalize() makes the final cut
    sparsity = {h["step"]: h["sparsity"] for h in during if "sparsity" in h}
    assert list(sparsity) == [2, 4, 5]  # the cuts, and the sparsity logged with the validation metric at 5
    assert 0.0 < sparsity[2] < sparsity[4] == sparsity[5] < 0.6 - 0.01
    # the selection metric every 3 steps (after steps 2 and 5): validate() on the training sample, a fraction
    val = [h for h in during if "val_metric" in h]
    assert [h["step"] for h in val] == [2, 5] and all(0.0 <= h["val_metric"] <= 1.0 for h in val)
    assert final["sparsity"] == stage.sparsity == pytest.approx(0.6, abs=0.005)


def test_a_gradient_criterion_scores_on_its_own_batches_before_the_first_cut(digits):
    model = _model(digits).eval()
    method = PruneMethod(PruneConfig(sparsity=0.5, criterion="taylor", score_batches=2, finetune={"steps": 0}))
    ctx = RunContext(task=digits, seed=0, batch_size=8, example_inputs=digits.example_inputs())
    method.attach(model, ctx)
    assert [method.pruner.criterion.batches_seen(name) for name in CONVS] == [2, 2, 2]
    assert not model.training and all(p.grad is None for p in model.parameters())  # mode and gradients restored
    (transform,) = method.finalize(model, ctx)  # no fine-tuning: cut now and freeze
    assert method.pruner.frozen and method.sparsity() == pytest.approx(0.5, abs=0.005)
    assert transform.op == "mask" and transform.args["layers"][:3] == CONVS


def test_mask_replay_attaches_hard_masks_by_name(digits):
    pruned = _model(digits)
    (stage,) = run_methods(pruned, digits, [PruneConfig(sparsity=0.8, **ONE_SHOT)], seed=0, batch_size=8, history=[])
    entry = stage.transforms[0].to_dict()
    fresh = replay(_model(digits, seed=9), [entry])
    assert [name for name, _, _ in M.masked_modules(fresh)] == entry["layers"]
    assert all(not m.soft and bool((m.mask == 1).all()) for _, _, m in M.masked_modules(fresh))  # values come next
    fresh.load_state_dict(pruned.state_dict(), strict=True)  # the mask buffers now have somewhere to go
    x = digits.x_test[:16]
    assert torch.equal(fresh.eval()(x), pruned.eval()(x))
    with pytest.raises(PrunqError, match=r"transforms\[0\] \(mask\): .*'features\.conv9'"):
        replay(_model(digits), [{"op": "mask", "layers": ["features.conv1", "features.conv9"]}])
