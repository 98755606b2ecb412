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


def test_calibration_batches_are_checked_and_an_error_names_the_batch():
    from prunq.core.errors import PrunqError
    from prunq.tasks import get_task

    task = get_task("digits")
    good = task.calibration_batches(2, 8, seed=1)
    assert len(good) == 2
    bad = [good[0], (good[1][0] * float("nan"), good[1][1])]
    task.train_batches = lambda batch_size, seed: iter(bad)
    with pytest.raises(PrunqError, match=r"^calibration batch 1 \(seed 1\): tensor 0 of the batch holds NaN"):
        task.calibration_batches(2, 8, seed=1)


# --------------------------------------------------------------------------------------------------
# resource limits: an absurd model argument or task option is one line naming the field, before any
# memory is allocated (build_from_zoo counts parameters on the meta device; prunq.tasks checks options)
# --------------------------------------------------------------------------------------------------

MODEL_LIMITS = [
    ("digits", "digits_cnn", {"width": 100}, r"^model\.kwargs\.width: 100 builds a model of 1,577,174,410 parameters, over the limit of 100,000,000$"),
    ("digits", "digits_cnn", {"width": 100_000}, r"^model\.kwargs\.width: must be a positive number up to 1000, got 100000$"),
    ("digits", "digits_cnn", {"width": float("inf")}, r"^model\.kwargs\.width: must be a positive number"),
    ("digits", "digits_cnn", {"width": float("nan")}, r"^model\.kwargs\.width: must be a positive number"),
    ("digits", "digits_cnn", {"width": "1"}, r"^model\.kwargs\.width: must be a positive number"),
    ("digits", "digits_cnn", {"dropout": "x"}, r"^model\.kwargs\.dropout: must be a number in \[0, 1\)"),
    ("digits", "digits_cnn", {"num_classes": 10**12}, r"^model\.kwargs\.num_classes: must be an integer in \[1, 100,000\]"),
    ("digits", "digits_cnn", {"in_channels": True}, r"^model\.kwargs\.in_channels: must be an integer"),
    ("digits", "digits_cnn", {"in_channels": 5000, "width": 30}, r"^model\.kwargs: digits_cnn\(in_channels=5000, width=30\) builds a model of"),
    ("cifar10", "resnet56", {"width": 50}, r"^model\.kwargs\.width: 50 builds a model of [\d,]+ parameters"),
    ("cifar10", "resnet20", {"num_classes": 100_000, "width": 40}, r"^model\.kwargs: resnet20\(.*\) builds a model of"),
    ("stereo", "stereo_net", {"width": 200}, r"^model\.kwargs\.width: 200 builds a model of"),
    ("stereo", "stereo_net", {"max_disp": 10**9}, r"^model\.kwargs\.max_disp: must be an integer in \[4, 2048\], got 1000000000$"),
    ("stereo", "stereo_net", {"groups": 10**6}, r"^model\.kwargs\.groups: must be an integer in \[1, 256\]"),
]  # fmt: skip


@pytest.mark.parametrize("task, name, kwargs, message", MODEL_LIMITS, ids=range(len(MODEL_LIMITS)))
def test_absurd_model_arguments_are_refused_before_allocating(task, name, kwargs, message):
    from prunq.tasks import build_model

    with pytest.raises(PrunqError, match=message):
        build_model(task, name, **kwargs)


def test_depth_is_bounded_and_building_draws_no_extra_random_numbers():
    from prunq.tasks.classification.models import CifarResNet, DigitsCNN, build

    with pytest.raises(PrunqError, match=r"^model\.kwargs\.depth: must be 6n\+2 with 1 <= n <= 200"):
        CifarResNet(6 * 10**6 + 2)
    with pytest.raises(PrunqError, match=r"^model\.kwargs\.depth"):
        CifarResNet("20")
    torch.manual_seed(0)
    a = build("digits_cnn", width=0.5).state_dict()
    torch.manual_seed(0)
    b = DigitsCNN(width=0.5)
    assert all(torch.equal(a[k], v) for k, v in b.state_dict().items())  # the meta-device count is invisible


def test_the_parameter_limit_is_generic():
    big = {"net": lambda n=1: nn.Linear(n, 10_000)}
    assert build_from_zoo(big, "net", n=100).weight.shape == (10_000, 100)
    with pytest.raises(PrunqError, match=r"^model\.kwargs\.n: 20000 builds a model of 200,010,000 parameters"):
        build_from_zoo(big, "net", n=20_000)  # refused on the meta device: nothing allocated


STEREO_OPTIONS = [
    ({"height": 10**6}, r"^task\.options\.height: 1000000 pixels, over the limit of 4096$"),
    ({"width": 5000}, r"^task\.options\.width: 5000 pixels, over the limit of 4096$"),
    ({"height": 4096, "width": 4096}, r"^task\.options\.height, width: 4096 x 4096 pixels, over the limit of 4,194,304"),
    ({"n_train": 10**12}, r"^task\.options\.n_train: 1,000,000,000,000 scenes, over the limit of 1,000,000$"),
    ({"n_val": 10**6}, r"^task\.options\.n_val: 1,000,000 scenes of 128 x 256 pixels are kept in memory"),
    ({"height": "x"}, r"^task\.height: must be a positive integer"),  # types: the task's own check
]  # fmt: skip


@pytest.mark.parametrize("options, message", STEREO_OPTIONS, ids=range(len(STEREO_OPTIONS)))
def test_absurd_stereo_options_are_refused(options, message):
    from prunq.tasks import get_task

    with pytest.raises(PrunqError, match=message):
        get_task("stereo", **options)
