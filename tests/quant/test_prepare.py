"""QuantConfig validation, prepare / calibrate / unprepare, state-dict round trip, per-layer summary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.prune.masks import Mask, attach_mask, set_mask, zero_pruned_
from prunq.core.records import layer_records
from prunq.quant import (
    ActQuantizer,
    QuantConfig,
    WeightQuantizer,
    bits_for,
    calibrate,
    prepare,
    quantizer_modules,
    unprepare,
)
from prunq.quant.weight import weight_quantizer


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))  # conv1 sees the raw (signed) input, conv2 a ReLU output
        x = self.conv2(x)
        x = self.up(x)  # input of up is signed (no ReLU)
        return self.fc(torch.relu(x).mean((2, 3)))


def masked_tiny(seed: int) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    for name in ("conv1", "conv2", "up", "fc"):
        layer = model.get_submodule(name)
        attach_mask(layer)
        set_mask(layer, (torch.rand_like(layer.parametrizations.weight.original) > 0.5).float())
        zero_pruned_(layer)
    return model


BATCHES = [torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]


# -- config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weight_bits": 9}, "quant.weight_bits: 9 is outside 2–8 (16 or 32 = not quantized)"),
        ({"act_bits": 1}, "quant.act_bits: 1 is outside 2–8"),
        ({"weight_bits": 4.0}, "quant.weight_bits: Input should be a valid integer"),
        ({"overrides": {"fc": {"weight_bits": 12}}}, "quant.overrides.fc.weight_bits: 12 is outside"),
        ({"overrides": {"fc": {"bits": 8}}}, "quant.overrides.fc.bits: unknown key"),
        ({"overrides": {"fc": 8}}, "quant.overrides.fc: Input should be a valid dictionary"),
        ({"weight_init": "median"}, "quant.weight_init: Input should be 'max' or 'mse'"),
        ({"act_calibration": "entropy"}, "quant.act_calibration: Input should be"),
        ({"percentile": 101.0}, "quant.percentile: 101.0 is outside (0, 100]"),
        ({"exclude": "fc"}, "quant.exclude: Input should be a valid tuple"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(PrunqError) as info:
        QuantConfig(**kwargs)
    assert message in str(info.value)


def test_config_defaults_and_exclude_list_becomes_tuple() -> None:
    c = QuantConfig(exclude=["fc"])  # type: ignore[arg-type]
    assert c.exclude == ("fc",) and c.weight_bits == 4 and c.act_bits == 8 and c.overrides == {}
    assert QuantConfig().overrides is not QuantConfig().overrides  # no shared mutable default


def test_bits_for_later_patterns_win() -> None:
    c = QuantConfig(weight_bits=4, act_bits=8, overrides={"conv*": {"weight_bits": 8}, "conv2": {"weight_bits": 2, "act_bits": 32}})
    assert bits_for(c, "conv1") == (8, 8)
    assert bits_for(c, "conv2") == (2, 32)
    assert bits_for(c, "fc") == (4, 8)


# -- prepare --------------------------------------------------------------------------------------
def test_prepare_structure_order_and_bits() -> None:
    model = masked_tiny(0)
    cfg = QuantConfig(weight_bits=4, act_bits=8, overrides={"fc": {"weight_bits": 32}, "up": {"act_bits": 16}}, exclude=("conv2",))
    bits = prepare(model, cfg)
    assert bits == {"conv1": (4, 8), "up": (4, 16), "fc": (32, 8)}
    plist = model.conv1.parametrizations.weight
    assert isinstance(plist[0], Mask) and isinstance(plist[1], WeightQuantizer)  # W_eff = Q(mask * W)
    assert weight_quantizer(model.conv2) is None and not hasattr(model.conv2, "input_quantizer")
    assert weight_quantizer(model.fc) is None and isinstance(model.fc.input_quantizer, ActQuantizer)
    assert not hasattr(model.up, "input_quantizer")
    names = [n for n, _ in quantizer_modules(model)]
    assert names == ["conv1.parametrizations.weight.1", "conv1.input_quantizer", "up.parametrizations.weight.1", "fc.input_quantizer"]
    with pytest.raises(PrunqError, match="already prepared"):
        prepare(model, cfg)


def test_forward_before_calibration_raises() -> None:
    model = Tiny()
    prepare(model, QuantConfig())
    with pytest.raises(RuntimeError, match="not calibrated"):
        model(BATCHES[0])


def test_calibrate_signedness_modes_and_grid() -> None:
    model = masked_tiny(1)
    prepare(model, QuantConfig(weight_bits=3, act_bits=4, act_calibration="max"))
    model.train()
    model.up.eval()  # a per-module mode must be restored too
    calibrate(model, BATCHES)
    assert model.training and model.conv1.training and not model.up.training
    signed = {n: bool(model.get_submodule(n).input_quantizer.signed) for n in ("conv1", "conv2", "up", "fc")}
    assert signed == {"conv1": True, "conv2": False, "up": True, "fc": False}
    # max calibration over all batches: conv1's input is the raw batch
    expected = max(float(b.abs().max()) for b in BATCHES) / 7
    assert model.conv1.input_quantizer.step.item() == pytest.approx(expected)
    for name in ("conv1", "conv2", "up", "fc"):
        layer = model.get_submodule(name)
        wq = weight_quantizer(layer)
        w = layer.weight.detach()
        assert torch.equal(w, wq(layer.parametrizations.weight[0](layer.parametrizations.weight.original)))
        assert w[layer.parametrizations.weight[0].mask == 0].eq(0).all()


def test_calibrate_with_forward_fn_and_unused_layer_error() -> None:
    model = Tiny()
    prepare(model, QuantConfig())
    calls = []

    def forward_fn(m: nn.Module, batch: tuple[torch.Tensor, int]) -> torch.Tensor:
        calls.append(batch[1])
        return m(batch[0])

    calibrate(model, [(b, i) for i, b in enumerate(BATCHES)], forward_fn)
    assert calls == [0, 1, 2]
    model2 = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    prepare(model2, QuantConfig())
    with pytest.raises(PrunqError, match="layer '1' received no input"):
        calibrate(model2, [torch.randn(1, 2)], lambda m, b: m[0](b))
    assert not model2[0].input_quantizer._observing and not model2[1].input_quantizer._observing


def test_qat_steps_keep_pruned_weights_zero_and_on_grid() -> None:
    model = masked_tiny(2)
    prepare(model, QuantConfig(weight_bits=2, act_bits=4, power_of_two=True, weight_init="mse", act_calibration="mse"))
    calibrate(model, BATCHES)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for b in BATCHES:
        opt.zero_grad()
        model(b).pow(2).mean().backward()
        opt.step()
    assert model.conv1.input_quantizer.step.grad is not None  # LSQ is learning the act step
    for name in ("conv1", "conv2", "up", "fc"):
        layer = model.get_submodule(name)
        mask = layer.parametrizations.weight[0].mask
        w = layer.weight.detach()
        assert w[mask == 0].eq(0).all()
        wq = weight_quantizer(layer)
        # on the grid without clamping first: w == k * step exactly, k in {-1, 0, 1} (2-bit narrow)
        step = wq.effective_step().reshape(-1, *([1] * (w.dim() - 1)))
        if w.shape[0] != step.shape[0]:  # ConvTranspose: steps are per canonical output channel
            step = step.reshape(1, -1, *([1] * (w.dim() - 2)))
        k = torch.round(w / step)
        assert torch.equal(k * step, w), name
        assert set(k.unique().tolist()) <= {-1.0, 0.0, 1.0}, name


def _state_dict_model(seed: int) -> Tiny:
    model = masked_tiny(seed)
    prepare(model, QuantConfig(weight_bits=4, act_bits=8, overrides={"fc": {"weight_bits": 8}}))
    return model


def test_state_dict_round_trip_strict_and_hooks_active() -> None:
    a = _state_dict_model(3)
    calibrate(a, BATCHES)
    opt = torch.optim.SGD(a.parameters(), lr=0.05)
    a(BATCHES[0]).sum().backward()
    opt.step()
    a.eval()
    sd = a.state_dict()
    assert "conv1.input_quantizer.signed" in sd and "conv1.parametrizations.weight.1.step" in sd
    assert "conv1.parametrizations.weight.0.mask" in sd

    b = _state_dict_model(4)  # different weights, masks and no calibration
    assert set(b.state_dict()) == set(sd)
    b.load_state_dict(sd, strict=True)
    b.eval()
    for name in ("conv1", "conv2", "up", "fc"):
        assert torch.equal(b.get_submodule(name).input_quantizer.signed, a.get_submodule(name).input_quantizer.signed)
    seen = []
    b.conv2.input_quantizer.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        out_b = b(x)
        assert torch.equal(out_b, a(x))
    assert len(seen) == 1  # the pre-hook called the reloaded quantizer
    k = seen[0] / b.conv2.input_quantizer.effective_step()
    assert torch.allclose(k, k.round(), atol=1e-4) and k.min() >= 0


def test_unprepare_keeps_masks_and_parameters() -> None:
    model = masked_tiny(5)
    originals = {n: model.get_submodule(n).parametrizations.weight.original for n in ("conv1", "up")}
    x = BATCHES[0]
    with torch.no_grad():
        ref = model(x)
    prepare(model, QuantConfig())
    calibrate(model, BATCHES)
    unprepare(model)
    assert list(quantizer_modules(model)) == []
    for name in ("conv1", "conv2", "up", "fc"):
        layer = model.get_submodule(name)
        assert not hasattr(layer, "input_quantizer") and len(layer._forward_pre_hooks) == 0
        plist = layer.parametrizations.weight
        assert len(plist) == 1 and isinstance(plist[0], Mask)
    for n, p in originals.items():
        assert model.get_submodule(n).parametrizations.weight.original is p
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    # and an unmasked layer goes back to a plain Parameter
    lin = nn.Linear(3, 2)
    w = lin.weight
    prepare(lin, QuantConfig())
    unprepare(lin)
    assert lin.weight is w and not hasattr(lin, "parametrizations")


def test_records_summarise_the_prepared_layers() -> None:
    model = Tiny()
    prepare(model, QuantConfig(weight_bits=4, act_bits=8, per_channel=True, overrides={"fc": {"weight_bits": 32}}, exclude=("up",)))
    rec = {r.name: r for r in layer_records(model)}
    assert (rec["conv1"].weight_bits, rec["conv1"].act_bits, rec["conv1"].weight_q.num_steps) == (4, 8, 4)
    assert rec["up"].weight_q is None and rec["up"].act_q is None
    assert rec["fc"].weight_q is None and rec["fc"].act_bits == 8
    model2 = Tiny()
    prepare(model2, QuantConfig(per_channel=False, power_of_two=True))
    q = {r.name: r for r in layer_records(model2)}["conv2"].weight_q
    assert (q.bits, q.num_steps, q.axis, q.power_of_two) == (4, 1, None, True)


def test_calibrate_again_keeps_learned_weight_steps() -> None:
    """Bug: calibrate() after QAT silently re-initialised learned weight steps."""
    model = Tiny()
    prepare(model, QuantConfig())
    calibrate(model, BATCHES)
    wq = weight_quantizer(model.conv1)
    with torch.no_grad():
        wq.step.mul_(3.0)  # as if learned
    learned = wq.step.detach().clone()
    calibrate(model, BATCHES)
    assert torch.equal(wq.step.detach(), learned)
    calibrate(model, BATCHES, reinit_weights=True)
    assert not torch.equal(wq.step.detach(), learned)


def test_resumed_qat_keeps_the_loaded_steps_through_calibrate() -> None:
    """Review: prepare -> load_state_dict(checkpoint) -> calibrate re-initialised the loaded steps."""
    model = Tiny()
    prepare(model, QuantConfig())
    calibrate(model, BATCHES)
    with torch.no_grad():
        weight_quantizer(model.conv1).step.mul_(3.0)
    state = model.state_dict()
    resumed = Tiny()
    prepare(resumed, QuantConfig())
    resumed.load_state_dict(state)
    calibrate(resumed, BATCHES)  # re-ranging activations only
    assert torch.equal(weight_quantizer(resumed.conv1).step, weight_quantizer(model.conv1).step)


def test_quant_patterns_must_match_a_layer() -> None:
    with pytest.raises(PrunqError, match="quant.overrides: pattern 'nope' matches no layer"):
        prepare(Tiny(), QuantConfig(overrides={"nope": {"weight_bits": 8}}))
    with pytest.raises(PrunqError, match="quant.exclude: pattern 'x\\*' matches no layer"):
        prepare(Tiny(), QuantConfig(exclude=("x*",)))


@pytest.mark.parametrize("field", ["per_channel", "learn_step", "power_of_two", "fold_bn"])
@pytest.mark.parametrize("value", ["yes", "true", 1, 0.0])
def test_flags_take_booleans_only(field, value):
    """Issue 10: pydantic's lax mode read quant.per_channel: "yes" as true."""
    with pytest.raises(PrunqError, match=rf"quant: {field}: Input should be a valid boolean"):
        QuantConfig.parse({field: value}, "quant")
    assert getattr(QuantConfig.parse({field: False}, "quant"), field) is False
