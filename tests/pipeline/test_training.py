"""The fine-tuning loop (prunq.pipeline.training): seeded and RNG-neutral, hooks in order, logging, optimizers
with weight decay on weights only. Fast tests use a one-parameter toy task whose loss is worked out by hand."""

from __future__ import annotations

import pytest
import torch

import prunq
from prunq.tasks import get_task


def test_fit_leaves_the_callers_rng_alone():
    from prunq.pipeline.training import fit

    task = get_task("digits")
    model = task.build_model("digits_cnn", width=0.25)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(model, task, prunq.TrainConfig(steps=2), batch_size=8, seed=0, stage="t", quiet=True)
    assert torch.equal(torch.rand(3), expected)


def test_weight_decay_spares_steps_biases_and_norms():
    from prunq.pipeline.training import make_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(2, 2))
    prunq.prepare(model, prunq.QuantConfig())
    opt = make_optimizer(model.named_parameters(), prunq.TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"0.parametrizations.weight.original", "3.parametrizations.weight.original"}


def test_loss_terms_are_added_and_logged():
    from prunq.pipeline.training import fit

    task = get_task("digits")
    model = task.build_model("digits_cnn", width=0.25)
    seen = []

    def l1(m):
        t = 1e-3 * sum(p.abs().sum() for p in m.parameters())
        seen.append(float(t.detach()))
        return {"l1": t}

    hist = fit(model, task, prunq.TrainConfig(steps=3), batch_size=8, seed=0, stage="t", quiet=True, loss_terms=l1)
    assert len(seen) == 3 and hist[0]["l1"] == pytest.approx(seen[0])


# ---------------------------------------------------------------------------------------------------
# A toy task: one parameter w, loss = c * sum(w) on every batch, so the gradient is c everywhere.
# ---------------------------------------------------------------------------------------------------


class _Scalar(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


class _ToyTask(prunq.Task):
    name = "toy"
    metric_name = "loss"
    higher_is_better = False

    def __init__(self, batches_per_epoch: int = 2, c: float = 1.0) -> None:
        self.batches_per_epoch, self.c = batches_per_epoch, c
        self.seeds: list[int] = []  # the seed of every epoch asked for
        self.modes: list[bool] = []  # model.training at every loss

    def build_model(self, name=None, **kw):
        return _Scalar()

    def train_batches(self, batch_size, seed):
        self.seeds.append(seed)
        return [(torch.full((batch_size,), float(seed * 10 + i)),) for i in range(self.batches_per_epoch)]

    def loss(self, model, batch):
        self.modes.append(model.training)
        return self.c * model.w.sum()

    def evaluate(self, model):
        return {"metric": float(model.w.sum())}

    def example_inputs(self):
        return (torch.zeros(1),)


def test_batches_forever_reshuffles_every_epoch_with_the_next_seed():
    from prunq.pipeline.training import batches_forever

    task = _ToyTask(batches_per_epoch=2)
    data = batches_forever(task, batch_size=1, seed=5)
    firsts = [float(next(data)[0][0]) for _ in range(5)]
    assert firsts == [50.0, 51.0, 60.0, 61.0, 70.0]  # epochs seeded 5, 6, 7
    assert task.seeds == [5, 6, 7]
    with pytest.raises(RuntimeError, match="yielded no training batch"):
        next(batches_forever(_ToyTask(batches_per_epoch=0), batch_size=1, seed=0))


@pytest.mark.parametrize(
    ("schedule", "moved"),
    [
        # Adam's first steps on a constant gradient move w by exactly lr_t (m_hat = v_hat = 1):
        # constant 4 * 0.1; cosine lr_t = 0.1 * (1 + cos(pi t / 4)) / 2 for t = 0..3: 0.1 * (1 + 0.854 + 0.5 + 0.146)
        ("constant", 0.4),
        ("cosine", 0.25),
    ],
)
def test_learning_rate_schedules_by_hand(schedule, moved):
    from prunq.pipeline.training import fit

    model = _Scalar()
    fit(model, _ToyTask(), prunq.TrainConfig(steps=4, lr=0.1, lr_schedule=schedule), batch_size=1, seed=0,
        stage="t", quiet=True)  # fmt: skip
    assert float(model.w.detach()) == pytest.approx(-moved, abs=1e-6)


def test_hooks_run_in_order_and_the_history_is_logged_every_log_every_steps():
    from prunq.pipeline.training import fit

    calls = []

    class Hooks:
        def loss_terms(self, model):
            calls.append("terms")
            return {"extra": 2.0 * model.w.sum()}  # total loss 3 w: gradient 3

        def after_backward(self):
            calls.append(f"backward {float(model.w.grad):g}")

        def after_step(self, t):
            calls.append(f"step {t}")
            return {"cut": 0.5} if t == 1 else None

    task = _ToyTask(c=1.0)
    model = _Scalar().eval()
    hist = fit(model, task, prunq.TrainConfig(steps=5, lr=1e-9), batch_size=1, seed=0, stage="ft", hooks=Hooks(),
               log_every=3, quiet=True)  # fmt: skip
    assert calls[:6] == ["terms", "backward 3", "step 0", "terms", "backward 3", "step 1"]
    assert len(calls) == 15
    # logged at t % 3 == 0 (0, 3), at the last step (4), and at a step whose after_step returned something (1)
    assert [(h["stage"], h["step"]) for h in hist] == [("ft", 0), ("ft", 1), ("ft", 3), ("ft", 4)]
    assert hist[1]["cut"] == 0.5 and "cut" not in hist[0]
    assert all(h["extra"] == pytest.approx(0.0, abs=1e-6) and h["loss"] == pytest.approx(0.0, abs=1e-6) for h in hist)
    assert task.modes == [True] * 5 and not model.training  # trained in train mode, handed back in eval mode
    assert model.w.grad is None  # gradients are not left behind


def test_zero_steps_do_nothing_and_a_diverging_loss_names_the_stage():
    from prunq.pipeline.training import fit

    model = _Scalar()
    history = [{"stage": "before"}]
    task = _ToyTask()
    assert fit(model, task, prunq.TrainConfig(steps=0), batch_size=1, seed=0, stage="t", history=history) is history
    assert history == [{"stage": "before"}] and task.seeds == [] and float(model.w.detach()) == 0.0
    with pytest.raises(FloatingPointError, match=r"quant: loss is nan at step 0; lower the learning rate"):
        fit(model, _ToyTask(c=float("nan")), prunq.TrainConfig(steps=3), batch_size=1, seed=0, stage="quant",
            quiet=True)  # fmt: skip
    assert float(model.w.detach()) == 0.0  # no step was taken


def test_optimizers_by_name():
    from prunq.pipeline.training import make_optimizer

    model = torch.nn.Linear(3, 2)
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        opt = make_optimizer(model.named_parameters(), prunq.TrainConfig(optimizer=name, lr=0.5, weight_decay=0.01))
        assert type(opt) is cls
        groups = [(len(g["params"]), g["weight_decay"], g["lr"]) for g in opt.param_groups]
        assert groups == [(1, 0.01, 0.5), (1, 0.0, 0.5)]  # the weight decays, the bias does not
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["nesterov"]
    model.bias.requires_grad_(False)  # frozen parameters are left out; an empty group is dropped
    opt = make_optimizer(model.named_parameters(), prunq.TrainConfig())
    assert [g["params"] for g in opt.param_groups] == [[model.weight]]


def test_sgd_without_momentum_is_a_valid_config():
    from prunq.pipeline.training import make_optimizer

    spec = prunq.TrainConfig(optimizer="sgd", momentum=0.0)  # validates: momentum >= 0
    opt = make_optimizer(torch.nn.Linear(3, 2).named_parameters(), spec)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.0
