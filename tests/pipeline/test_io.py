"""Saving and loading runs (prunq.pipeline.io): safetensors + model.json, replayed in order, errors naming the
file. Tiny hand-made models and manifests; the end-to-end round trip of a real compressed run is in test_run.py
(it shares that module's compressed model)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

import prunq
from prunq.core.errors import PrunqError
from prunq.pipeline.io import MANIFEST_FILE, MODEL_FILE, load, load_state, read_manifest, save, save_tensors
from prunq.prune import masks as M
from prunq.tasks import build_model

USER = {"origin": "user", "class": "Sequential"}


def _masked_linear() -> nn.Sequential:
    """Linear(4, 3) with a hard mask keeping 5 of its 12 weights."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3))
    M.attach_mask(model[0])
    M.set_mask(model[0], torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 1]]))
    return model


def _manifest(*transforms: dict, model: dict | None = None) -> dict:
    return {"format": 2, "prunq_version": prunq.__version__, "model": model or USER, "transforms": list(transforms)}


def test_save_and_load_a_masked_user_model(tmp_path):
    model = _masked_linear()
    manifest = _manifest({"op": "mask", "layers": ["0"]})
    out = save(SimpleNamespace(model=model, manifest=manifest, metrics={"metric": 0.5}), tmp_path / "a" / "run")
    assert out == tmp_path / "a" / "run"  # parents are created
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", MANIFEST_FILE, MODEL_FILE]
    assert json.loads((out / "metrics.json").read_text()) == {"metric": 0.5}
    assert json.loads((out / MANIFEST_FILE).read_text()) == manifest
    with safe_open(str(out / MODEL_FILE), "pt") as f:  # the full state dict: shadow weights, mask, bias
        assert f.metadata() == {"prunq_manifest_format": "2"}
        assert set(f.keys()) == {"0.bias", "0.parametrizations.weight.original", "0.parametrizations.weight.0.mask"}

    with pytest.raises(PrunqError, match=r"your own model \(Sequential\); pass a fresh instance"):
        load(out)
    loaded = load(out, model=nn.Sequential(nn.Linear(4, 3)).train())
    assert not loaded.training
    mask = M.get_mask(loaded[0])
    assert mask is not None and not mask.soft  # replayed as a hard mask, values from the state dict
    assert int(mask.mask.sum()) == 5 and int((loaded[0].weight != 0).sum()) == 5
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_model_converted_after_the_run_is_recorded_and_loads(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    prunq.prepare(model, prunq.QuantConfig(weight_bits=4, act_bits=8))
    prunq.calibrate(model, [torch.rand(8, 4)])
    plan = {"0": {"weight": {"bits": 4, "per_channel": True, "power_of_two": False},
                  "act": {"bits": 8, "power_of_two": False}}}  # fmt: skip
    prunq.convert(model)
    manifest = _manifest({"op": "quantize", "layers": plan})
    out = save((model, manifest), tmp_path)
    recorded = json.loads((out / MANIFEST_FILE).read_text())["transforms"]
    assert recorded[-1] == {"op": "convert", "layers": {"0": {"bits": 4, "steps": 3}}}  # 3 output channels
    assert len(manifest["transforms"]) == 1  # the caller's manifest is not changed
    assert not (out / "metrics.json").exists()  # a (model, manifest) pair has no metrics
    loaded = load(out, model=nn.Sequential(nn.Linear(4, 3)))
    x = torch.rand(5, 4)
    assert torch.equal(loaded(x), model.eval()(x))
    assert int(loaded[0].weight_bits) == 4 and not hasattr(loaded[0], "parametrizations")


def test_a_zoo_model_is_rebuilt_from_the_manifest(tmp_path):
    spec = {"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {"width": 0.25}}
    model = build_model("digits", "digits_cnn", width=0.25)  # the zoo, without the task's data
    save((model, _manifest(model=spec)), tmp_path / "z")
    loaded = load(tmp_path / "z")
    assert type(loaded).__name__ == "DigitsCNN" and loaded.features.conv1.out_channels == 8
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    bad = {**spec, "kwargs": {"depth": 3}}
    (tmp_path / "z" / MANIFEST_FILE).write_text(json.dumps(_manifest(model=bad)))
    with pytest.raises(PrunqError, match="depth"):
        load(tmp_path / "z")


def test_a_checkpoint_that_does_not_fit_names_the_file(tmp_path):
    save((nn.Sequential(nn.Linear(4, 3)), _manifest()), tmp_path / "r")
    with pytest.raises(PrunqError, match=rf"{MODEL_FILE}: does not match the model"):
        load(tmp_path / "r", model=nn.Sequential(nn.Linear(4, 2)))
    # a transform naming a layer the model lacks is refused by the replay, before any weight is read
    (tmp_path / "r" / MANIFEST_FILE).write_text(json.dumps(_manifest({"op": "mask", "layers": ["fc"]})))
    with pytest.raises(PrunqError, match=r"transforms\[0\] \(mask\)"):
        load(tmp_path / "r", model=nn.Sequential(nn.Linear(4, 3)))


def test_load_state_errors(tmp_path):
    with pytest.raises(PrunqError, match="nope.safetensors: checkpoint not found"):
        load_state(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(PrunqError, match="bad.safetensors: not a readable safetensors checkpoint"):
        load_state(tmp_path / "bad.safetensors")
    x = torch.arange(6.0, requires_grad=True).reshape(2, 3).t()  # not contiguous, needs grad
    save_tensors(tmp_path / "t.safetensors", {"x": x})
    assert torch.equal(load_state(tmp_path / "t.safetensors")["x"], x.detach())


def test_read_manifest_errors_and_format_1(tmp_path):
    with pytest.raises(PrunqError, match="run directory not found"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(PrunqError, match=r"model.json: missing \(is .* a prunq run directory\?\)"):
        read_manifest(tmp_path)
    p = tmp_path / MANIFEST_FILE
    p.write_text("{")
    with pytest.raises(PrunqError, match="not valid JSON"):
        read_manifest(tmp_path)
    p.write_text("[]")
    with pytest.raises(PrunqError, match="expected a JSON object"):
        read_manifest(tmp_path)
    p.write_text(json.dumps({"format": 2, "model": USER}))
    with pytest.raises(PrunqError, match="'transforms' list"):
        read_manifest(tmp_path)
    # format 1 (masked / folded / one quant config) reads as the equivalent transform log
    old = {"model": {"task": "digits", "name": "digits_cnn"}, "masked": ["a"], "folded": [], "quant": None}
    p.write_text(json.dumps(old))
    assert read_manifest(tmp_path) == {
        "format": 2, "prunq_version": None, "model": {"task": "digits", "name": "digits_cnn", "origin": "zoo"},
        "transforms": [{"op": "mask", "layers": ["a"]}],
    }  # fmt: skip


@pytest.mark.parametrize(
    "manifest, message",
    [
        ({"format": 2, "model": {"origin": "zoo", "name": "digits_cnn"}, "transforms": []}, "model.task: missing"),
        ({"format": 2, "model": [1], "transforms": []}, "model: expected a mapping"),
        ({"format": 1, "model": {}, "masked": 5, "folded": [], "quant": None}, "masked: expected a list"),
        ({"format": 1, "model": {}, "masked": [], "folded": [1], "quant": None}, "folded: expected a list"),
        ({"format": 1, "model": {}, "masked": [], "folded": [], "quant": [1, 2]}, "quant: expected a mapping"),
        ({"format": True, "model": {}, "transforms": []}, "unknown manifest format True"),
    ],
)  # fmt: skip
def test_crafted_manifests_are_one_line_errors(tmp_path, manifest, message):
    import json as _json

    (tmp_path / "model.json").write_text(_json.dumps(manifest))
    with pytest.raises(PrunqError) as e:
        prunq.load(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_deeply_nested_json_is_a_one_line_error(tmp_path):
    (tmp_path / "model.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(PrunqError, match="not valid JSON"):
        prunq.load(tmp_path)


def test_load_converted_gives_the_same_outputs_without_parametrizations(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    prunq.prepare(m, prunq.QuantConfig(weight_bits=4, act_bits=8))
    prunq.calibrate(m, [torch.rand(8, 6)])
    manifest = {"format": 2, "model": {"origin": "user"}, "transforms": [
        {"op": "quantize", "layers": {"0": {"weight": {"bits": 4, "axis": 0}, "act": {"bits": 8}},
                                      "2": {"weight": {"bits": 4, "axis": 0}, "act": {"bits": 8}}}}]}  # fmt: skip
    save((m, manifest), tmp_path / "r")
    fresh = lambda: nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))  # noqa: E731
    fq, baked = load(tmp_path / "r", model=fresh()), load(tmp_path / "r", model=fresh(), convert=True)
    x = torch.rand(5, 6)
    assert not any(hasattr(mod, "parametrizations") for mod in baked.modules())
    assert torch.allclose(fq(x), baked(x), atol=1e-6)


@pytest.mark.parametrize("corrupt, message", [("nan", "holds non-finite values"), ("mask", "is not a binary mask")])
def test_load_refuses_non_finite_weights_and_non_binary_masks(tmp_path, corrupt, message):
    from safetensors.torch import load_file, save_file

    from prunq.prune.masks import attach_mask

    m = nn.Sequential(nn.Linear(3, 2))
    attach_mask(m[0])
    manifest = {"format": 2, "model": {"origin": "user"}, "transforms": [{"op": "mask", "layers": ["0"]}]}
    save((m, manifest), tmp_path / "r")
    f = tmp_path / "r" / MODEL_FILE
    state = load_file(str(f))
    if corrupt == "nan":
        state["0.parametrizations.weight.original"][0, 0] = float("nan")
    else:
        state["0.parametrizations.weight.0.mask"][0, 0] = 0.5
    save_file(state, str(f))
    fresh = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(PrunqError, match=message):
        load(tmp_path / "r", model=fresh)


def test_the_same_model_gives_the_same_bytes_and_the_usual_file_mode(tmp_path):
    model = _masked_linear()
    manifest = _manifest({"op": "mask", "layers": ["0"]})
    a, *others = [save((model, manifest), tmp_path / f"r{i}") for i in range(6)]
    for b in others:  # safetensors writes several metadata keys in a random order, file after file
        for name in (MODEL_FILE, MANIFEST_FILE):
            assert (a / name).read_bytes() == (b / name).read_bytes()
    probe = tmp_path / "probe"
    probe.write_text("x")  # what any file written here gets (0666 less the umask)
    assert (a / MODEL_FILE).stat().st_mode & 0o777 == probe.stat().st_mode & 0o777
    save_tensors(tmp_path / "t.safetensors", {"x": torch.ones(2)})
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == probe.stat().st_mode & 0o777


# --------------------------------------------------------------------------------------------------
# hostile model.json files, end to end: one line naming the file and the field, nothing built
# --------------------------------------------------------------------------------------------------

_ZOO = {"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {"width": 0.25}}

HOSTILE_RUNS = [
    (_manifest(model={**_ZOO, "kwargs": {"width": 100_000}}), "model.kwargs.width: must be a positive number up to 1000"),
    (_manifest(model={**_ZOO, "kwargs": {"width": 100}}), "model.kwargs.width: 100 builds a model of 1,577,174,410 parameters"),
    (_manifest(model={**_ZOO, "kwargs": {"depth": "x"}}), "model: digits_cnn does not take these arguments"),
    (_manifest(model={**_ZOO, "task": "nope"}), "model.task: unknown task 'nope'"),
    (_manifest(model={**_ZOO, "name": "vgg"}), "model.name: unknown model 'vgg'"),
    (_manifest({"op": "mask", "layers": ["features.conv9"]}, model=_ZOO), "(mask): no layer 'features.conv9' in the model (DigitsCNN)"),
    (_manifest({"op": "mask", "layers": ["features.relu1"]}, model=_ZOO), "layer 'features.relu1' (ReLU) is not a prunable layer"),
    (_manifest({"op": "fold_bn", "pairs": [["features.conv1", "features.bn2"]]}, model=_ZOO), "is not a conv followed by"),
    (_manifest({"op": "mask", "layers": ["__class__"]}, model=_ZOO), "(mask).layers[0]: '__class__' is not a layer name"),
    (_manifest(*[{"op": "mask", "layers": [f"x{i}" for i in range(600)]}] * 200, model=_ZOO), "more than 100,000 layer names"),
]  # fmt: skip


@pytest.mark.parametrize("manifest, message", HOSTILE_RUNS, ids=range(len(HOSTILE_RUNS)))
def test_hostile_manifests_in_a_run_are_one_line_errors(tmp_path, manifest, message):
    save((build_model("digits", "digits_cnn", width=0.25), _manifest(model=_ZOO)), tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(PrunqError) as e:
        load(tmp_path)
    text = str(e.value)
    assert text.startswith(f"{tmp_path / MANIFEST_FILE}: ") and message in text and "\n" not in text


@pytest.mark.parametrize(
    "raw, message",
    [
        ('{"format": 2, "model": {"origin": "user"}, "transforms": [], "x": 1e400}', "x: inf is not a finite number"),
        ('{"format": 2, "model": {"origin": "user"}, "transforms": [], "x": NaN}', "x: nan is not a finite number"),
        ('{"format": 2, "model": {"origin": "user"}, "transforms": [' + "[" * 10_000 + "]" * 10_000 + "]}", "not valid JSON"),
        ('{"format": 2, "transforms": [' + "[" * 500 + "]" * 500 + "]}", "nested more than 32 levels deep"),
    ],
)  # fmt: skip
def test_unusable_json_in_a_manifest_is_one_line(tmp_path, raw, message):
    (tmp_path / MANIFEST_FILE).write_text(raw)
    with pytest.raises(PrunqError) as e:
        read_manifest(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value) and MANIFEST_FILE in str(e.value)


def test_evaluate_on_a_hostile_manifest_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    save((build_model("digits", "digits_cnn", width=0.25), _manifest(model=_ZOO)), tmp_path)
    layer = {"name": "features.conv1", "params": 72, "nonzeros": 72, "macs": 4608, "weight_bits": None, "act_bits": None}
    stage = {"metric": 0.5, "params": 1, "macs": 1, "bops": 1, "memory_bits": 1, "sparsity": 0.0,
             "weight_bits": None, "act_bits": None}  # fmt: skip
    metrics = {"task": "digits", "metric_name": "top1", "higher_is_better": True, "dense": stage, "pruned": stage,
               "compressed": stage, "memory_ratio": 1.0, "bops_ratio": 1.0, "layers": [layer]}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "recipe.yaml").write_text("task: {name: digits}\nmodel: {name: digits_cnn, kwargs: {width: 0.25}}\n")
    hostile = _manifest({"op": "quantize", "layers": {"features.conv1": {"weight": {"bits": "4"}}}}, model=_ZOO)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(hostile))
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "-m", "prunq", "evaluate", str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"{MANIFEST_FILE}: transforms[0] (quantize).layers['features.conv1'].weight.bits: expected an integer" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_model_with_masks_only_converted_after_the_run_saves_and_loads(tmp_path):
    """Review: prunq.save recorded `convert` only for layers with weight grids, so a masks-only model
    converted after the run was saved without it and did not load (its masks were replayed)."""
    import prunq
    from prunq.prune import masks as M
    from prunq.quant import convert
    from prunq.tasks.classification.models import build

    torch.manual_seed(0)
    m = build("digits_cnn").eval()
    M.attach_mask(m.classifier.fc1, soft=False)
    with torch.no_grad():
        M.get_mask(m.classifier.fc1).mask[::2] = 0.0
    manifest = {"format": 2, "model": {"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {}},
                "transforms": [{"op": "mask", "layers": ["classifier.fc1"]}]}  # fmt: skip
    convert(m)
    prunq.save((m, manifest), tmp_path / "run")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(prunq.load(tmp_path / "run")(x), m(x))
