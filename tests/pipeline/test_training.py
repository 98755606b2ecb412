"""The fine-tuning loop (prunq.pipeline.training): seeded and RNG-neutral, hooks in order, logging, optimizers
with weight decay on weights only. Fast tests use a one-parameter toy task whose loss is worked out by hand."""

from __future__ import annotations

import copy

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
    from prunq.pipeline.training import Diverged, fit

    model = _Scalar()
    history = [{"stage": "before"}]
    task = _ToyTask()
    assert fit(model, task, prunq.TrainConfig(steps=0), batch_size=1, seed=0, stage="t", history=history) is history
    assert history == [{"stage": "before"}] and task.seeds == [] and float(model.w.detach()) == 0.0
    with pytest.raises(Diverged, match=r"^quant: diverged at step 0: the loss is nan; lower the learning rate$"):
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


# ---------------------------------------------------------------------------------------------------
# The divergence guard (issue 10): non-finite loss, gradient, weight; a loss far above its level; bad data.
# ---------------------------------------------------------------------------------------------------


class _Scripted(_ToyTask):
    """The loss at step t is ``values[t]`` (gradient 0 unless ``fn`` makes one); ``scale`` is the task's
    loss_scale."""

    def __init__(self, values, scale=None, fn=None, data=None):
        super().__init__(batches_per_epoch=3)
        self.values, self.scale, self.fn, self.data, self.t = values, scale, fn, data, 0

    @property
    def loss_scale(self):
        return self.scale

    def train_batches(self, batch_size, seed):
        if self.data is not None:
            return self.data
        return super().train_batches(batch_size, seed)

    def loss(self, model, batch):
        v = self.values[min(self.t, len(self.values) - 1)]
        self.t += 1
        return (self.fn(model.w) if self.fn else model.w.sum() * 0.0) + v


def _fit_scripted(task, steps=None, optimizer="adam", lr=1e-3, stage="prune"):
    from prunq.pipeline.training import fit

    return fit(_Scalar(), task, prunq.TrainConfig(steps=steps or len(task.values), optimizer=optimizer, lr=lr),
               batch_size=1, seed=0, stage=stage, quiet=True)  # fmt: skip


def test_a_pruning_cut_jump_is_tolerated_and_a_blow_up_stops_the_run():
    from prunq.pipeline.training import Diverged

    _fit_scripted(_Scripted([1.0, 1.0, 1.0, 1.0, 50.0, 1.0]))  # a cut: 50x the running level, then recovery
    with pytest.raises(Diverged, match=r"^prune: diverged at step 4: the loss 150 is over 100x its level 1; "
                                       r"lower the learning rate$"):  # fmt: skip
        _fit_scripted(_Scripted([1.0, 1.0, 1.0, 1.0, 150.0]))


def test_the_tasks_loss_scale_floors_the_reference_level():
    """A converged model's tiny loss must not make every cut look like a divergence."""
    from prunq.pipeline.training import Diverged

    values = [1e-4] * 4 + [0.5]
    _fit_scripted(_Scripted(values, scale=0.01))  # 0.5 < 100 * max(1e-4, 0.01)
    with pytest.raises(Diverged, match="step 4"):
        _fit_scripted(_Scripted(values))  # no scale: the first loss (1e-4) is the floor


def test_a_non_finite_gradient_or_weight_stops_the_run_before_it_spreads():
    from prunq.pipeline.training import Diverged

    # sqrt(w) at w = 0: the loss is 0 (finite), its gradient is inf
    with pytest.raises(Diverged, match=r"^quant: diverged at step 0: the gradient is not finite"):
        _fit_scripted(_Scripted([0.0], fn=lambda w: w.abs().sqrt().sum()), stage="quant")
    # plain SGD, gradient 1e30, lr 1e30: the weight overflows float32 (to -inf) in the first update
    with pytest.raises(Diverged, match=r"^dense: diverged at step 0: a weight is not finite after the update"):
        _fit_scripted(_Scripted([0.0], fn=lambda w: 1e30 * w.sum()), optimizer="sgd", lr=1e30, stage="dense")


def test_non_finite_data_is_named_as_data_not_blamed_on_the_learning_rate():
    from prunq.core.errors import PrunqError
    from prunq.pipeline.training import Diverged

    data = [(torch.ones(2),), (torch.tensor([1.0, float("nan")]),), (torch.ones(2),)]
    with pytest.raises(PrunqError, match=r"^prune: training batch 1 of epoch 0 \(step 1\): tensor 0 of the batch "
                                         r"holds NaN or inf \(the data, not the learning rate\)$") as e:  # fmt: skip
        _fit_scripted(_Scripted([1.0] * 3, data=data))
    assert not isinstance(e.value, Diverged)


def test_adam_at_lr_1e6_on_the_digits_cnn_stops_within_a_few_steps():
    """The probe's case: lr 1e6 drove the loss to 1e20 and prunq wrote a normal-looking run."""
    from prunq.pipeline.training import Diverged, fit

    task = get_task("digits")
    model = task.build_model("digits_cnn", width=0.25)
    with pytest.raises(Diverged, match=r"^dense: diverged at step [1-5]: ") as e:
        fit(model, task, prunq.TrainConfig(steps=50, lr=1e6), batch_size=32, seed=0, stage="dense", quiet=True)
    assert "\n" not in str(e.value)


def test_a_checkpoint_is_written_only_once_the_next_loss_passed_the_guard():
    """The last checkpoint kept after a divergence is one whose weights gave an acceptable loss."""
    from prunq.pipeline.training import Diverged, fit

    planned, written = [], []

    def checkpoint(state):
        planned.append(state.step)
        return lambda: written.append(state.step)

    task = _Scripted([1.0] * 6 + [500.0])
    with pytest.raises(Diverged, match="step 6"):
        fit(_Scalar(), task, prunq.TrainConfig(steps=7), batch_size=1, seed=0, stage="prune", quiet=True,
            checkpoint=checkpoint, checkpoint_every=2)  # fmt: skip
    assert planned == [2, 4, 6] and written == [2, 4]  # the state after step 5 gave the loss 500: not kept


def test_fit_resumed_from_its_checkpoint_equals_fit_uninterrupted():
    from prunq.pipeline.training import fit

    task = get_task("digits")
    spec = prunq.TrainConfig(steps=9, lr=1e-3, lr_schedule="cosine")
    torch.manual_seed(0)
    base = task.build_model("digits_cnn", width=0.25)
    ref = copy.deepcopy(base)
    hist_ref = fit(ref, task, spec, batch_size=16, seed=3, stage="t", quiet=True, log_every=1)
    saved = {}

    def checkpoint(state):
        if state.step == 4:
            saved.update(state=state, model=copy.deepcopy(model.state_dict()))
        return lambda: None

    model = copy.deepcopy(base)
    fit(model, task, spec, batch_size=16, seed=3, stage="t", quiet=True, log_every=1, checkpoint=checkpoint,
        checkpoint_every=2)  # fmt: skip
    resumed = copy.deepcopy(base)
    resumed.load_state_dict(saved["model"])
    hist = fit(resumed, task, spec, batch_size=16, seed=3, stage="t", quiet=True, log_every=1, resume=saved["state"])
    assert hist == hist_ref[4:]  # the same losses from step 4 on (the data stream sought, the RNG restored)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), ref.state_dict().values()))


def test_a_loss_growing_step_by_step_is_caught_against_its_lowest_level():
    """The review's case: a running average follows a loss growing 1.1x per step and never sees it 100x away."""
    from prunq.pipeline.training import Diverged

    values = [1.1**t for t in range(80)]
    with pytest.raises(Diverged, match=r"over 100x its level 1;"):
        _fit_scripted(_Scripted(values))
