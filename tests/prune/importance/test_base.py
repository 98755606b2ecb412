"""The criterion interface (prunq.prune.importance.base): accumulation as a mean or an EMA, worked out by hand on
a toy gradient criterion whose contribution is the gradient's group sum; reset, checkpoints, errors."""

from __future__ import annotations

import pytest
import torch

import prunq.prune.importance.base as base
from prunq.prune.granularity import Channel, Element
from prunq.prune.importance.base import Criterion, register_criterion

G1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
G2 = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
W = torch.ones(2, 2)


class _GradSum(Criterion):
    """Contribution = the group sum of the gradient (so every number below is a sum of G1 and G2)."""

    name = "gradsum-test"
    needs_grad = True

    def contribution(self, weight, grad, gran):
        return gran.reduce_sum(grad)

    def scores(self, name, weight, gran):
        return self.accumulated(name)


def test_mean_over_batches_per_element_and_per_group():
    c = _GradSum()
    for g in (G1, G2):
        c.accumulate("fc", W, g, Element())
        c.accumulate("rows", W, g, Channel())
    assert c.batches_seen("fc") == 2 and c.batches_seen("other") == 0
    assert c.accumulated("fc").tolist() == [[3.0, 4.0], [5.0, 6.0]]  # (G1 + G2) / 2
    assert c.accumulated("rows").tolist() == [7.0, 11.0]  # row sums (3, 7) and (11, 15), averaged


def test_exponential_moving_average():
    c = _GradSum(ema=0.25)
    c.accumulate("fc", W, G1, Element())
    assert c.accumulated("fc").tolist() == G1.tolist()  # the first batch starts the average
    c.accumulate("fc", W, G2, Element())
    # 0.25 * G1 + 0.75 * G2 = [[0.25 + 3.75, 0.5 + 4.5], [0.75 + 5.25, 1 + 6]]
    assert c.accumulated("fc").tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert c.batches_seen("fc") == 2


def test_statistics_are_float_copies_of_detached_inputs():
    c = _GradSum()
    grad = G1.double().requires_grad_()
    c.accumulate("fc", W, grad, Element())
    acc = c.accumulated("fc")
    assert acc.dtype == torch.float32 and not acc.requires_grad
    with torch.no_grad():
        grad.mul_(100)  # the caller reuses its gradient buffer: the statistic does not change
    assert c.accumulated("fc").tolist() == G1.tolist()


def test_reset_and_checkpoints():
    c = _GradSum()
    c.accumulate("fc", W, G1, Element())
    state = c.state_dict()
    c.accumulate("fc", W, G2, Element())  # after the checkpoint: not in it
    assert state["count"] == {"fc": 1} and state["acc"]["fc"].tolist() == G1.tolist()
    c.reset()
    assert c.batches_seen("fc") == 0
    with pytest.raises(RuntimeError, match=r"'gradsum-test' has no gradient statistics for 'fc'.*Pruner\.accumulate"):
        c.scores("fc", W, Element())
    fresh = _GradSum()
    fresh.load_state_dict(state)
    fresh.accumulate("fc", W, G2, Element())
    assert fresh.accumulated("fc").tolist() == [[3.0, 4.0], [5.0, 6.0]]  # resumed: the mean of G1 and G2
    assert state["acc"]["fc"].tolist() == G1.tolist()  # loading copied the checkpoint, it did not adopt it


def test_criteria_without_gradients_ignore_accumulate_and_the_base_has_no_scores():
    plain = Criterion()
    plain.accumulate("fc", W, G1, Element())
    assert plain.batches_seen("fc") == 0 and plain.state_dict() == {"acc": {}, "count": {}}
    with pytest.raises(NotImplementedError):
        plain.scores("fc", W, Element())
    with pytest.raises(NotImplementedError):
        plain.contribution(W, G1, Element())


@pytest.mark.parametrize("ema", [0.0, 1.0, -0.5])
def test_ema_must_be_strictly_between_0_and_1(ema):
    with pytest.raises(ValueError, match=r"prune.ema: .* is outside \(0, 1\)"):  # PrunqError is a ValueError
        _GradSum(ema=ema)


def test_register_criterion_makes_a_class_available_by_name(monkeypatch):
    monkeypatch.setattr(base, "CRITERIA", dict(base.CRITERIA))  # leave the real registry as it was
    assert register_criterion(_GradSum) is _GradSum
    assert base.CRITERIA["gradsum-test"] is _GradSum
    assert {"magnitude", "random", "taylor", "fisher"} <= set(base.CRITERIA)
