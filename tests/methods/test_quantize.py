"""The ``quantize`` method (prunq.methods.quantize) through the one runner on digits: batch-norm folded, per-layer
bits recorded (overrides included), masks frozen; and the replay of its transforms on a fresh model."""

from __future__ import annotations

import copy

import pytest
import torch

from prunq.core.errors import PrunqError
from prunq.core.manifest import replay
from prunq.core.method import RunContext
from prunq.core.records import layer_records
from prunq.methods.quantize import CALIB_SEED, QuantizeMethod, calibration_batches
from prunq.pipeline.run import run_methods
from prunq.prune import masks as M
from prunq.quant.prepare import QuantConfig, convert, converted_layers
from prunq.quant.weight import weight_quantizer
from prunq.tasks.classification.digits import DigitsTask

LAYERS = ["features.conv1", "features.conv2", "features.conv3", "classifier.fc1", "classifier.fc2"]
PAIRS = {("features.conv1", "features.bn1"), ("features.conv2", "features.bn2"), ("features.conv3", "features.bn3")}
#: max-based calibration: what is recorded and replayed does not depend on how the steps were found
FAST = dict(weight_init="max", act_calibration="max", calib_batches=1, finetune={"steps": 0})
OVERRIDES = {"classifier.*": {"weight_bits": 8}, "classifier.fc2": {"act_bits": 6}}
CFG = QuantConfig(weight_bits=4, act_bits=8, overrides=OVERRIDES, **FAST)
#: what CFG gives each layer (later override patterns win, per key)
BITS = {"features.conv1": (4, 8), "features.conv2": (4, 8), "features.conv3": (4, 8),
        "classifier.fc1": (8, 8), "classifier.fc2": (8, 6)}  # fmt: skip


@pytest.fixture(scope="module")
def digits() -> DigitsTask:
    return DigitsTask()


def _model(task: DigitsTask, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return task.build_model("digits_cnn", width=0.25)


@pytest.fixture(scope="module")
def quantized(digits):
    """An untrained DigitsCNN with a soft mask on conv2, quantized by the runner: (model, stage)."""
    model = _model(digits)
    M.attach_mask(model.features.conv2, soft=True)
    M.set_mask(model.features.conv2, torch.rand(16, 8, 3, 3) < 0.5)
    (stage,) = run_methods(model, digits, [CFG], seed=0, batch_size=8, history=[])
    return model, stage


def _bits(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {r.name: (r.weight_bits, r.act_bits) for r in layer_records(model)}


def test_fold_and_quantize_are_recorded_with_per_layer_bits(quantized):
    model, stage = quantized
    fold, quant = (t.to_dict() for t in stage.transforms)
    assert (stage.name, stage.kind, stage.sparsity) == ("quant", "quantize", None)
    assert fold["op"] == "fold_bn" and {tuple(p) for p in fold["pairs"]} == PAIRS
    assert all(isinstance(getattr(model.features, bn), torch.nn.Identity) for bn in ("bn1", "bn2", "bn3"))
    assert quant["op"] == "quantize" and list(quant["layers"]) == LAYERS
    assert {n: (s["weight"]["bits"], s["act"]["bits"]) for n, s in quant["layers"].items()} == BITS
    assert _bits(model) == BITS  # the recorded plan is what the model carries
    assert not M.get_mask(model.features.conv2).soft  # masks are frozen (hard) in stage 2


def test_replaying_fold_and_quantize_gives_the_same_layers(digits, quantized):
    model, stage = quantized
    # the mask entry stands for the prune method's (the fixture attached its mask by hand)
    log = [{"op": "mask", "layers": ["features.conv2"]}, *(t.to_dict() for t in stage.transforms)]
    replayed = replay(_model(digits, seed=5), log)
    assert _bits(replayed) == BITS
    quantizers = [weight_quantizer(m) for n, m in replayed.named_modules() if n in BITS]
    replayed.load_state_dict(model.state_dict(), strict=True)
    assert not any(q.needs_init for q in quantizers)  # loaded steps are never re-initialised by calibration
    x = digits.x_test[:32]
    assert torch.equal(replayed.eval()(x), model.eval()(x))


def test_convert_replay_checks_the_recorded_layers(digits, quantized):
    model, stage = quantized
    baked = convert(copy.deepcopy(model))
    layers = converted_layers(baked)
    assert {n: v["bits"] for n, v in layers.items()} == {n: wb for n, (wb, _) in BITS.items()}
    log = [{"op": "mask", "layers": ["features.conv2"]}, *(t.to_dict() for t in stage.transforms)]
    fresh = replay(_model(digits), [*log, {"op": "convert", "layers": layers}])
    assert converted_layers(fresh) == layers and _bits(fresh) == BITS
    fresh.load_state_dict(baked.state_dict(), strict=True)
    wrong = {**layers, "classifier.fc1": {"bits": 4, "steps": layers["classifier.fc1"]["steps"]}}
    with pytest.raises(PrunqError, match=r"transforms\[3\] \(convert\): .*converted layers differ"):
        replay(_model(digits), [*log, {"op": "convert", "layers": wrong}])


def test_format_1_quantize_config_replays_one_config_for_the_whole_model(digits):
    fresh = replay(_model(digits), [{"op": "quantize_config", "config": {"weight_bits": 2, "act_bits": 4}}])
    assert _bits(fresh) == {name: (2, 4) for name in LAYERS}


def test_calibration_uses_its_own_seeded_training_batches(digits):
    batches = calibration_batches(digits, QuantConfig(calib_batches=3), batch_size=4, seed=2)
    expected = digits.calibration_batches(3, 4, seed=2 + CALIB_SEED)
    assert len(batches) == 3 and all(torch.equal(a[1], b[1]) for a, b in zip(batches, expected))
    assert not torch.equal(batches[0][1], digits.calibration_batches(1, 4, seed=2)[0][1])  # not the training order


def test_without_fold_bn_nothing_is_folded(digits):
    model = _model(digits)
    method = QuantizeMethod(QuantConfig(fold_bn=False, **FAST))
    ctx = RunContext(task=digits, seed=0, batch_size=8, example_inputs=digits.example_inputs())
    method.attach(model, ctx)
    assert [t.op for t in method.finalize(model, ctx)] == ["quantize"]
    assert isinstance(model.features.bn1, torch.nn.BatchNorm2d)
