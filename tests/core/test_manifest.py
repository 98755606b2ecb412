"""The manifest is a transform log replayed through a fixed map: unknown ops and bad entries are one-line
errors, never an import."""

from __future__ import annotations

import pytest
from torch import nn

import prunq.methods  # noqa: F401  (registers the built-in transforms)
from prunq.core.errors import PrunqError
from prunq.core.manifest import TRANSFORMS, register_transform, replay, upgrade, validate
from prunq.prune.masks import get_mask


def test_replay_applies_transforms_in_order():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    replay(m, [{"op": "mask", "layers": ["1"]}, {"op": "quantize", "layers": {"1": {"weight": {"bits": 2}, "act": None}}}])
    assert get_mask(m[0]) is None and get_mask(m[1]) is not None
    assert [type(p).__name__ for p in m[1].parametrizations["weight"]] == ["Mask", "WeightQuantizer"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"op": "os.system", "cmd": "rm -rf /"}, "unknown op 'os.system'"),
        ({"layers": []}, "expected a mapping with an 'op'"),
        ({"op": "mask", "layers": ["nope"]}, "transforms[0] (mask): no layer 'nope' in the model (Sequential)"),
        ({"op": "mask"}, "transforms[0] (mask).layers: missing"),
        ({"op": "quantize", "layers": {"0": {"weight": {"bits": 12}}}}, "transforms[0] (quantize)"),
    ],
)
def test_bad_transforms_are_one_line_errors(entry, message):
    with pytest.raises(PrunqError) as e:
        replay(nn.Sequential(nn.Linear(2, 2)), [entry])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_map_is_fixed_in_code():
    assert {"mask", "fold_bn", "quantize", "convert"} <= set(TRANSFORMS)
    assert all(callable(fn) for fn in TRANSFORMS.values())


def test_format_1_manifests_are_upgraded():
    old = {"format": 1, "model": {"task": "digits", "name": "digits_cnn", "kwargs": {}}, "masked": ["a"],
           "folded": [["a", "b"]], "quant": {"weight_bits": 4}}  # fmt: skip
    new = upgrade(old)
    assert new["model"]["origin"] == "zoo"
    assert [t["op"] for t in new["transforms"]] == ["mask", "fold_bn", "quantize_config"]
    with pytest.raises(PrunqError, match="unknown manifest format 7"):
        upgrade({"format": 7})
    with pytest.raises(PrunqError, match="missing key 'masked'"):
        upgrade({"format": 1, "model": {}})


# --------------------------------------------------------------------------------------------------
# the schema: every hostile entry is one line naming the file and the field, before anything is built
# --------------------------------------------------------------------------------------------------

_Q = {"weight": {"bits": 4, "axis": 0}, "act": {"bits": 8}}
_OK = {"format": 2, "prunq_version": "0.1", "model": {"origin": "user", "class": "Sequential"}, "transforms": []}


def _with(**changes) -> dict:
    return {**_OK, **changes}


def _nested(depth: int) -> list:
    v: list = []
    for _ in range(depth):
        v = [v]
    return v


HOSTILE = [
    # top level
    (_with(format="2"), "unknown manifest format '2'"),
    (_with(format=2.0), "unknown manifest format 2.0"),
    (_with(evil=1), "evil: unknown key"),
    (_with(prunq_version=[1]), "prunq_version: expected a string, got list"),
    (_with(transforms={"op": "mask"}), "'transforms' list"),
    (_with(transforms=[{"op": "mask", "layers": []}] * 1001), "transforms: List should have at most 1000"),
    # the model entry
    (_with(model="digits_cnn"), "model: expected a mapping, got str"),
    (_with(model={"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": "width=1"}),
     "model.kwargs: expected a mapping, got str"),
    (_with(model={"origin": "zoo", "task": "digits", "name": ["digits_cnn"]}), "model.name: expected a string, got list"),
    (_with(model={"origin": "zoo", "name": "digits_cnn"}), "model.task: missing"),
    (_with(model={"origin": ["zoo"]}), "model.origin: expected 'zoo' or 'user'"),
    (_with(model={"origin": "user", "evil": 1}), "model.evil: unknown key"),
    (_with(model={"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {"__class__": 1}}),
     "model.kwargs.__class__"),
    # numbers and nesting, anywhere
    (_with(model={"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {"width": float("inf")}}),
     "model.kwargs.width: inf is not a finite number"),
    (_with(model={"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {"width": float("nan")}}),
     "model.kwargs.width: nan is not a finite number"),
    (_with(model={"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {"width": 10**30}}),
     "model.kwargs.width: integer out of the 64-bit range"),
    (_with(model={"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {"width": _nested(200)}}),
     "nested more than 32 levels deep"),
    # transform entries
    (_with(transforms=[3]), "transforms[0]: expected a mapping with an 'op' name"),
    (_with(transforms=[{"op": 3}]), "transforms[0]: expected a mapping with an 'op' name"),
    (_with(transforms=[{"op": "os.system", "cmd": "ls"}]), "transforms[0]: unknown op 'os.system'"),
    (_with(transforms=[{"op": "mask", "layers": "conv1"}]), "transforms[0] (mask).layers: expected a list, got str"),
    (_with(transforms=[{"op": "mask", "layers": [""]}]), "transforms[0] (mask).layers[0]: '' is not a layer name"),
    (_with(transforms=[{"op": "mask", "layers": ["__class__"]}]), "layers[0]: '__class__' is not a layer name (dunder"),
    (_with(transforms=[{"op": "mask", "layers": ["a.__dict__.b"]}]), "is not a layer name (dunder part '__dict__')"),
    (_with(transforms=[{"op": "mask", "layers": ["a..b"]}]), "'a..b' is not a layer name (empty part)"),
    (_with(transforms=[{"op": "mask", "layers": [1]}]), "layers[0]: expected a string, got int"),
    (_with(transforms=[{"op": "mask", "layers": ["a", "a"]}]), "layer 'a' is listed twice"),
    (_with(transforms=[{"op": "mask", "layers": [], "evil": 1}]), "transforms[0] (mask).evil: unknown key"),
    (_with(transforms=[{"op": "mask", "layers": [f"l{i}" for i in range(100_001)]}]), "List should have at most 100000"),
    (_with(transforms=[{"op": "fold_bn", "pairs": [["conv"]]}]), "(fold_bn).pairs[0]: List should have at least 2"),
    (_with(transforms=[{"op": "fold_bn", "pairs": "ab"}]), "(fold_bn).pairs: expected a list, got str"),
    (_with(transforms=[{"op": "quantize", "layers": ["fc"]}]), "(quantize).layers: expected a mapping, got list"),
    (_with(transforms=[{"op": "quantize", "layers": {"fc": "4"}}]), "layers.fc: expected a mapping, got str"),
    (_with(transforms=[{"op": "quantize", "layers": {"fc": {"weight": {"bits": "4"}}}}]),
     "layers.fc.weight.bits: expected an integer, got str"),
    (_with(transforms=[{"op": "quantize", "layers": {"fc": {"weight": {"bits": True}}}}]),
     "layers.fc.weight.bits: expected an integer, got bool"),
    (_with(transforms=[{"op": "quantize", "layers": {"fc": {"weight": {"bits": 99}}}}]),
     "layers.fc.weight.bits: Input should be less than or equal to 8"),
    (_with(transforms=[{"op": "quantize", "layers": {"fc": {"weight": {"bits": 4, "evil": 1}}}}]),
     "layers.fc.weight.evil: unknown key"),
    (_with(transforms=[{"op": "quantize", "layers": {"a.b": {**_Q, "evil": 1}}}]), "layers['a.b'].evil: unknown key"),
    (_with(transforms=[{"op": "quantize_config", "config": "w4"}]), "(quantize_config).config: expected a mapping"),
    (_with(transforms=[{"op": "convert", "layers": {"fc": {"bits": 4, "steps": 0}}}]),
     "layers.fc.steps: Input should be greater than or equal to 1"),
    # format 1
    ({"format": 1, "model": {}, "masked": [], "folded": [], "quant": None, "evil": 1}, "'evil': unknown key"),
    ({"format": 1, "model": {"task": "digits", "name": 3}, "masked": [], "folded": [], "quant": None},
     "model.name: expected a string, got int"),
    ({"format": 1, "model": {}, "masked": ["__class__"], "folded": [], "quant": None}, "is not a layer name"),
]  # fmt: skip


@pytest.mark.parametrize("manifest, message", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_manifests_are_one_line_errors_naming_the_field(manifest, message):
    with pytest.raises(PrunqError) as e:
        upgrade(manifest, "run/model.json")
    text = str(e.value)
    assert text.startswith("run/model.json: ") and message in text and "\n" not in text
    assert len(text) < 400


def test_a_good_manifest_passes_unchanged():
    good = _with(transforms=[{"op": "mask", "layers": ["0", "1"]}, {"op": "fold_bn", "pairs": [["0", "1"]]},
                             {"op": "quantize", "layers": {"0": _Q, "1": {"weight": None, "act": None}}},
                             {"op": "convert", "layers": {"0": {"bits": 4, "steps": 3}}}])  # fmt: skip
    assert validate(good) is good
    zoo = _with(model={"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {"width": 0.5}})
    assert validate(zoo) is zoo
    assert validate(_with(model=None))["model"] is None  # absent: a user model


@pytest.mark.parametrize(
    "transforms, message",
    [
        ([{"op": "mask", "layers": ["2"]}], "transforms[0] (mask): no layer '2' in the model (Sequential)"),
        ([{"op": "mask", "layers": ["1"]}], "layer '1' (ReLU) is not a prunable layer"),
        ([{"op": "mask", "layers": [f"x{i}" for i in range(20_000)]}], "no layer 'x0' in the model (Sequential) (+19999 more)"),
        ([{"op": "fold_bn", "pairs": [["0", "1"]]}], "is not a conv followed by a matching BatchNorm"),
        ([{"op": "quantize", "layers": {"1": _Q}}], "layer '1' is not a compressible layer"),
        ([{"op": "quantize_config", "config": {"weight_bits": "x"}}], "config: weight_bits"),
    ],
)  # fmt: skip
def test_replay_refuses_names_the_model_lacks(transforms, message):
    with pytest.raises(PrunqError) as e:
        replay(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), transforms)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_20000_layer_manifest_is_checked_in_linear_time():
    names = [f"features.{i}.conv" for i in range(20_000)]
    big = _with(transforms=[{"op": "mask", "layers": names}, {"op": "quantize", "layers": dict.fromkeys(names, _Q)}])
    assert validate(big) is big  # the schema itself is fine with it ...
    with pytest.raises(PrunqError, match=r"no layer 'features.0.conv' in the model \(Sequential\) \(\+19999 more\)"):
        replay(nn.Sequential(nn.Linear(2, 2)), big["transforms"])  # ... the model is not
    with pytest.raises(PrunqError, match="at most 1000 items"):
        validate(_with(transforms=[{"op": "mask", "layers": names[:1]}] * 20_000))
    with pytest.raises(PrunqError, match="more than 100,000 layer names in all"):
        validate(_with(transforms=[{"op": "mask", "layers": names}] * 6))
    # a model that has its layers replays them all (each quantizer's step starts from max, not an MSE
    # search: the state dict sets the steps anyway)
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(200)])
    layers = [str(i) for i in range(200)]
    replay(model, [{"op": "mask", "layers": layers}, {"op": "quantize", "layers": dict.fromkeys(layers, _Q)}])
    assert get_mask(model[199]) is not None and model[199].parametrizations["weight"][1].init == "mse"


def test_a_plugin_op_can_register_its_schema():
    from prunq.core.manifest import SCHEMAS, Entry, LayerName

    class Scale(Entry):
        layer: LayerName
        factor: float

    @register_transform("scale-test", schema=Scale)
    def _scale(model, entry):
        model.get_submodule(entry["layer"]).weight.data.mul_(entry["factor"])

    try:
        replay(nn.Sequential(nn.Linear(2, 2)), [{"op": "scale-test", "layer": "0", "factor": 2.0}])
        with pytest.raises(PrunqError, match=r"\(scale-test\)\.factor: expected|\(scale-test\)\.factor: Input"):
            replay(nn.Sequential(nn.Linear(2, 2)), [{"op": "scale-test", "layer": "0", "factor": "x"}])
        with pytest.raises(PrunqError, match=r"\(scale-test\)\.layer: '__init__' is not a layer name"):
            validate(_with(transforms=[{"op": "scale-test", "layer": "__init__", "factor": 1.0}]))
    finally:
        TRANSFORMS.pop("scale-test")
        SCHEMAS.pop("scale-test")
