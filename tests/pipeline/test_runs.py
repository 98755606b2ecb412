"""Run directories (prunq.pipeline.runs): the task and dense model a recipe names, and what write_run writes.
``compress_recipe`` end to end is in test_run.py (its module fixture)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.pipeline.io import load_state, save_tensors
from prunq.pipeline.recipes import load_recipe, parse_recipe
from prunq.pipeline.run import CompressResult
from prunq.pipeline.runs import dense_model, make_task, write_run
from prunq.tasks.classification.digits import DigitsTask

SMALL = {"model": {"name": "digits_cnn", "kwargs": {"width": 0.25}}, "task": {"batch_size": 8}}


@pytest.fixture(scope="module")
def digits() -> DigitsTask:
    return DigitsTask()


def test_make_task_passes_options_and_names_bad_ones():
    task = make_task(parse_recipe({"task": {"name": "digits", "options": {"seed": 3, "augment": True}}}))
    assert isinstance(task, DigitsTask) and (task.seed, task.augment) == (3, True)
    with pytest.raises(PrunqError, match=r"^task\.options: .*colour"):
        make_task(parse_recipe({"task": {"options": {"colour": True}}}))
    with pytest.raises(PrunqError, match=r"^task\.options: .*data_dir"):  # digits are bundled: no data_dir
        make_task(parse_recipe({"task": {"data_dir": "/tmp"}}))


def test_dense_model_from_a_checkpoint(tmp_path, digits):
    torch.manual_seed(5)
    trained = digits.build_model("digits_cnn", width=0.25)
    save_tensors(tmp_path / "dense.safetensors", trained.state_dict())
    recipe = parse_recipe({**SMALL, "model": {**SMALL["model"], "checkpoint": str(tmp_path / "dense.safetensors")}})
    model, history, seconds = dense_model(recipe, digits, quiet=True)
    assert history == [] and seconds >= 0.0  # loaded, not trained
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))

    wider = recipe.with_(**{"model.kwargs": {"width": 0.5}})
    with pytest.raises(PrunqError, match=r"dense.safetensors: does not match model 'digits_cnn'"):
        dense_model(wider, digits, quiet=True)
    missing = recipe.with_(**{"model.checkpoint": str(tmp_path / "none.safetensors")})
    with pytest.raises(PrunqError, match="none.safetensors: checkpoint not found"):
        dense_model(missing, digits, quiet=True)
    with pytest.raises(PrunqError, match="depth"):
        dense_model(recipe.with_(**{"model.kwargs": {"depth": 3}}), digits, quiet=True)


def test_dense_model_is_seeded_by_the_recipe_and_leaves_the_callers_rng_alone(digits):
    recipe = parse_recipe({**SMALL, "dense": {"steps": 2}})
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, history, _ = dense_model(recipe, digits, quiet=True)
    assert torch.equal(torch.rand(3), expected)  # neither the initialisation nor the training reseeded the caller
    assert [h["step"] for h in history] == [0, 1] and all(h["stage"] == "dense" for h in history)
    b, _, _ = dense_model(recipe, digits, quiet=True)
    c, _, _ = dense_model(recipe.with_(seed=1), digits, quiet=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.features.conv1.weight, c.features.conv1.weight)


def _result(previews: dict, dense_state: dict | None) -> CompressResult:
    model = nn.Sequential(nn.Linear(2, 2))
    manifest = {"format": 2, "model": {"origin": "user", "class": "Sequential"}, "transforms": []}
    return CompressResult(model, {"task": "toy", "metric": 0.25}, manifest, [], previews, dense_state)


def test_write_run_writes_what_the_result_has(tmp_path):
    recipe = parse_recipe(SMALL)
    write_run(tmp_path / "a", recipe, _result({}, None), render=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "metrics.json", "model.json", "model.safetensors", "recipe.yaml"
    ]  # fmt: skip
    assert load_recipe(tmp_path / "a" / "recipe.yaml") == recipe  # the resolved recipe reads back the same
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == {"task": "toy", "metric": 0.25}

    previews = {"dense.disp": torch.ones(2, 3)}
    dense = {"0.weight": torch.eye(2), "0.bias": torch.zeros(2)}
    write_run(tmp_path / "b", recipe, _result(previews, dense), render=False)
    assert torch.equal(load_state(tmp_path / "b" / "previews.safetensors")["dense.disp"], torch.ones(2, 3))
    assert torch.equal(load_state(tmp_path / "b" / "dense.safetensors")["0.weight"], torch.eye(2))
