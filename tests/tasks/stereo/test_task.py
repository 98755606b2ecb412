"""StereoTask: seeded batches, a finite differentiable loss, deterministic evaluation, the registry."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from prunq.core.errors import PrunqError
from prunq.tasks import TASKS, get_task
from prunq.tasks.stereo import task as task_module
from prunq.tasks.stereo.task import StereoTask

KEYS = {"epe", "d1", "bad1", "bad2", "bad3"}


@pytest.fixture(scope="module")
def tiny():
    return StereoTask(height=32, width=64, max_disp=16, n_train=8, n_val=2, eval_middlebury=False)


def test_attributes_and_registry(tiny):
    assert (tiny.name, tiny.metric_name, tiny.higher_is_better) == ("stereo", "epe", False)
    assert "stereo" in TASKS
    t = get_task("stereo", height=32, width=64, max_disp=16, n_train=2, n_val=1, eval_middlebury=False)
    assert isinstance(t, StereoTask)
    with pytest.raises(PrunqError):
        tiny.build_model("resnet20")
    assert tiny.build_model().max_disp == 16


def test_train_batches_seeded(tiny):
    a = list(tiny.train_batches(3, seed=0))
    assert [len(b[0]) for b in a] == [3, 3, 2]
    left, right, disp = a[0]
    assert left.shape == right.shape == (3, 3, 32, 64) and disp.shape == (3, 32, 64)
    b = list(tiny.train_batches(3, seed=0))
    c = list(tiny.train_batches(3, seed=1))
    assert all(torch.equal(x[2], y[2]) for x, y in zip(a, b))
    assert not all(torch.equal(x[2], y[2]) for x, y in zip(a, c))
    with pytest.raises(PrunqError):
        tiny.train_batches(0, seed=0)


def test_loss_and_evaluate(tiny):
    torch.manual_seed(0)
    model = tiny.build_model()
    batch = next(iter(tiny.train_batches(2, seed=0)))
    loss = tiny.loss(model, batch)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
    loss.backward()
    assert model.features.block1.conv.weight.grad is not None

    model.train()
    r1 = tiny.evaluate(model)
    assert model.training and all(m.training for m in model.modules())
    assert set(r1) == {"metric", "val"} and set(r1["val"]) == KEYS
    assert r1["metric"] == r1["val"]["epe"] and math.isfinite(r1["metric"])
    assert tiny.evaluate(model) == r1  # deterministic (eval-mode BN, fixed validation scenes)

    left, right = tiny.example_inputs()
    assert left.shape == right.shape == (1, 3, 32, 64)


def test_loss_ignores_invalid_pixels(tiny):
    model = tiny.build_model()
    left, right, disp = next(iter(tiny.train_batches(2, seed=0)))
    disp = torch.full_like(disp, float("inf"))
    loss = tiny.loss(model, (left, right, disp))
    assert float(loss.detach()) == 0.0
    loss.backward()  # still differentiable


def test_bad_arguments():
    with pytest.raises(PrunqError):
        StereoTask(height=32, width=64, max_disp=40)  # max_disp must be < width / 2
    with pytest.raises(PrunqError):
        StereoTask(n_train=0)


def test_evaluate_middlebury():
    """Full-size motorcycle (500 x 741) through an untrained net: finite numbers, all keys (~0.5 s)."""
    t = StereoTask(height=32, width=64, max_disp=16, n_train=2, n_val=1, eval_middlebury=True)
    torch.manual_seed(0)
    model = t.build_model(max_disp=64)
    r = t.evaluate(model)
    assert set(r["middlebury"]) == KEYS and math.isfinite(r["middlebury"]["epe"])
    # the preview is the same full-size prediction the metric was computed from
    pred = t.previews(model)["middlebury"]
    _, _, gt = task_module._motorcycle()
    assert pred.shape == (500, 741)
    valid = torch.isfinite(gt[0])
    assert (pred - gt[0]).abs()[valid].mean().item() == pytest.approx(r["middlebury"]["epe"], rel=1e-5)


def test_training_scene_cache_changes_no_value():
    kw = dict(height=32, width=64, max_disp=16, n_train=5, n_val=1, eval_middlebury=False)
    cached, fresh = StereoTask(**kw), StereoTask(**kw, cache=False)
    for _ in range(2):  # the second epoch comes from the cache
        for a, b in zip(cached.train_batches(2, seed=3), fresh.train_batches(2, seed=3)):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(cached._train_cache) == 5 and not fresh._train_cache
    assert cached.previews(cached.build_model()) == {}  # no Middlebury, nothing to show


def test_docstring_examples():
    result = doctest.testmod(task_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_training_batches_are_checked_inf_marks_missing_ground_truth_nan_is_refused():
    task = StereoTask(height=32, width=64, max_disp=16, n_train=2, n_val=1, eval_middlebury=False)
    left, right, disp = next(iter(task.train_batches(1, 0)))
    disp[..., 0] = float("inf")
    task.check_batch((left, right, disp))  # no ground truth there: fine
    for bad, what in (((left * float("nan"), right, disp), "left image"), ((left, right, disp * float("nan")), "NaN")):
        with pytest.raises(PrunqError, match=what):
            task.check_batch(bad)
    assert task.loss_scale == 4.0  # max_disp / 4
