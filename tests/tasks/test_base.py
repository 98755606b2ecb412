"""What the pipeline needs from a task (prunq.tasks.base): the defaults of Task, the inference() context and
build_from_zoo's errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.tasks.base import Task, build_from_zoo, inference


class _Counting(Task):
    """A task whose epoch is ``n`` batches ``(seed, i)``."""

    name = "counting"
    metric_name = "acc"

    def __init__(self, n: int) -> None:
        self.n = n

    def build_model(self, name, **kwargs):
        return nn.Linear(1, 1)

    def train_batches(self, batch_size, seed):
        return [(torch.tensor([seed, i]),) for i in range(self.n)]

    def loss(self, model, batch):
        return torch.zeros(())

    def evaluate(self, model):
        return {"metric": 1.0}

    def example_inputs(self):
        return (torch.zeros(1, 1),)


def test_inference_restores_every_mode_and_gradients():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout()).train()
    model[1].eval()  # a frozen BN inside a training model
    with inference(model) as m:
        assert m is model and not any(x.training for x in model.modules())
        assert not torch.is_grad_enabled()
        assert not model(torch.ones(3, 2)).requires_grad
    assert [x.training for x in model.modules()] == [True, True, False, True]
    assert torch.is_grad_enabled()
    with pytest.raises(KeyError):
        with inference(model):
            raise KeyError("boom")
    assert [x.training for x in model.modules()] == [True, True, False, True]  # restored on errors too


def test_task_defaults():
    task = _Counting(n=3)
    with pytest.raises(PrunqError, match="task 'counting' has no validation split"):
        task.validate(nn.Linear(1, 1))
    assert [b[0].tolist() for b in task.calibration_batches(2, batch_size=4, seed=7)] == [[7, 0], [7, 1]]
    assert len(_Counting(n=1).calibration_batches(5, batch_size=4)) == 1  # a short epoch gives what it has
    kwargs = {"width": 0.5}
    assert task.model_kwargs("any", **kwargs) == kwargs and task.previews(nn.Linear(1, 1)) == {}
    assert task.higher_is_better


def test_a_task_must_implement_the_abstract_methods():
    class Partial(Task):
        name = "partial"

        def loss(self, model, batch):
            return torch.zeros(())

    with pytest.raises(TypeError, match="abstract"):
        Partial()


def _net(width: float = 1.0, depth: int = 2) -> nn.Module:
    return nn.Sequential(*[nn.Linear(2, 2) for _ in range(depth)])


def test_build_from_zoo():
    zoo = {"net": _net, "other": _net}
    assert len(build_from_zoo(zoo, "net", depth=3)) == 3
    with pytest.raises(PrunqError, match=r"^model\.name: unknown model 'vgg' \(choose from net, other\)$"):
        build_from_zoo(zoo, "vgg")
    allowed = r"^model: net does not take these arguments \(.*'colour'.*\); allowed: width, depth$"
    with pytest.raises(PrunqError, match=allowed):
        build_from_zoo(zoo, "net", colour=True)
