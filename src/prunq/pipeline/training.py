"""A small, generic fine-tuning loop with hooks: what the pipeline uses for every stage."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.utils import get_total_norm
from tqdm.auto import tqdm

from prunq.core.errors import PrunqError
from prunq.tasks.base import Task


class BatchStream:
    """Training batches forever: shuffled epochs, a new shuffle (seed + epoch) each, with a position
    (``epoch``, ``index`` within it) that a checkpoint records and :meth:`seek` restores.

    The tasks' epochs depend only on their seed, so seeking replays the skipped batches of the epoch
    (cheap next to training them) and yields exactly what an uninterrupted stream would.
    """

    def __init__(self, task: Task, batch_size: int, seed: int) -> None:
        self.task, self.batch_size, self.seed = task, batch_size, seed
        self.epoch, self.index = 0, 0
        self._it: Iterator | None = None

    def seek(self, epoch: int, index: int) -> None:
        """Continue at batch ``index`` of epoch ``epoch``."""
        self.epoch, self.index, self._it = int(epoch), 0, None
        for _ in range(int(index)):
            next(self)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.task.train_batches(self.batch_size, self.seed + self.epoch))
            batch = next(self._it, None)
            if batch is not None:
                self.index += 1
                return batch
            if self.index == 0:
                raise RuntimeError(f"task {self.task.name!r} yielded no training batch")
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
        raise RuntimeError(f"task {self.task.name!r} yielded no training batch")  # pragma: no cover


def batches_forever(task: Task, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Cycle through shuffled epochs, a new shuffle (seed + epoch) each time."""
    return BatchStream(task, batch_size, seed)


def _decays(name: str, p: torch.Tensor) -> bool:
    # Weight decay shrinks weights toward zero; applied to a quantizer's step it shrinks the grid, to a
    # bias or a normalisation parameter it fights the affine shift. Only weight matrices/kernels decay.
    return p.dim() > 1 and not name.endswith("step")


def make_optimizer(named_params, spec) -> torch.optim.Optimizer:
    """The optimizer a :class:`~prunq.core.config.TrainConfig` names; weight decay on weights only."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    decay = [p for n, p in named if _decays(n, p)]
    rest = [p for n, p in named if not _decays(n, p)]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if spec.optimizer == "sgd":
        # Nesterov needs momentum; with momentum 0 it is plain SGD.
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.momentum > 0)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr)
    return torch.optim.Adam(groups, lr=spec.lr)


def rng_devices() -> list[int]:
    """The devices whose generators ``torch.manual_seed`` reseeds (and ``fork_rng`` must restore)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


class Hooks(Protocol):
    """What :func:`fit` calls on a method (see :class:`prunq.core.method.Method`)."""

    def loss_terms(self, model: nn.Module) -> dict[str, torch.Tensor]: ...  # noqa: D102
    def after_backward(self) -> None: ...  # noqa: D102
    def after_step(self, t: int) -> dict | None: ...  # noqa: D102


#: A loss more than this many times above its reference level stops the run (see :func:`fit`).
DIVERGENCE_FACTOR = 100.0


class Diverged(PrunqError):
    """Fine-tuning stopped: a non-finite loss, gradient or weight, or a loss far above its level."""


@dataclass
class FitState:
    """Where a :func:`fit` is, for a checkpoint: steps done, the logged running loss and the divergence
    reference, the optimizer's and the schedule's state, the RNG states, the data position. ``fit`` hands
    one to its ``checkpoint`` callback and continues from one given as ``resume`` — bitwise as if never
    stopped (on one thread)."""

    step: int
    running: float
    first_loss: float
    #: the lowest running loss of the stage so far (the divergence guard's reference)
    low: float
    optimizer: dict[str, Any]
    param_names: list[str]
    scheduler: dict[str, Any] | None
    rng: dict[str, torch.Tensor]
    data: tuple[int, int]


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    for d in rng_devices():
        out[f"cuda:{d}"] = torch.cuda.get_rng_state(d)
    return out


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    for d in rng_devices():
        if f"cuda:{d}" in state:
            torch.cuda.set_rng_state(state[f"cuda:{d}"], d)


def fit(
    model: nn.Module,
    task: Task,
    spec,
    *,
    batch_size: int,
    seed: int,
    stage: str,
    hooks: Hooks | None = None,
    after_backward: Callable[[], None] | None = None,
    after_step: Callable[[int], dict | None] | None = None,
    loss_terms: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
    history: list[dict] | None = None,
    log_every: int = 25,
    quiet: bool = False,
    checkpoint: Callable[[FitState], Callable[[], None]] | None = None,
    checkpoint_every: int = 0,
    resume: FitState | None = None,
) -> list[dict]:
    """Run ``spec.steps`` optimizer steps of ``task.loss`` (+ any extra loss terms) on ``model``.

    ``hooks`` (a method) or the single callables: ``loss_terms(model)`` returns named terms added to the
    task loss (logged by name); ``after_backward()`` runs between backward and the optimizer step
    (gradient statistics); ``after_step(t)`` after it (schedules); a dict it returns is merged into the
    log line of that step. The history gets one entry every ``log_every`` steps:
    ``{"stage", "step", "loss", ...}``. The global RNG is seeded with ``seed`` for the run (dropout,
    augmentation) and restored afterwards: a library call does not reseed the caller's process.

    ``checkpoint(state)`` is called every ``checkpoint_every`` steps (not after the last) with a
    :class:`FitState` (its own copies); it snapshots what else it keeps and returns a ``write()`` that
    ``fit`` calls only once the next step passed the divergence guard (loss, gradient, updated weights) —
    so a checkpoint on disk is always one whose weights gave an acceptable step. ``resume`` continues from a FitState.

    **Divergence guard**: every batch is checked by ``task.check_batch`` (non-finite data is named as
    such, not blamed on the learning rate); the run stops with :class:`Diverged` — one line naming the
    stage and step — when the loss, the gradient norm or the weight norm is not finite, or when the loss
    exceeds ``DIVERGENCE_FACTOR`` (100) times its reference level: the larger of the lowest running loss
    of the stage so far (the logged exponential average, 0.9) and the task's ``loss_scale`` (the loss of an
    uninformed model, e.g. ln(classes); without one, the stage's first loss). The lowest level, not the
    current one, so that a loss growing step by step is caught too; a pruning cut's jump stays well below
    it; a learning rate that blows up crosses it within steps.
    """
    history = [] if history is None else history
    if spec.steps <= 0:
        return history
    if hooks is not None:
        loss_terms, after_backward, after_step = hooks.loss_terms, hooks.after_backward, hooks.after_step
    with torch.random.fork_rng(devices=rng_devices()):
        torch.manual_seed(seed)
        _fit(model, task, spec, batch_size, seed, stage, after_backward, after_step, loss_terms, history, log_every,
             quiet, checkpoint, checkpoint_every, resume)  # fmt: skip
    return history


def _fit(model, task, spec, batch_size, seed, stage, after_backward, after_step, loss_terms, history, log_every, quiet,
         checkpoint, checkpoint_every, resume):  # fmt: skip
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = make_optimizer(named, spec)
    names = [n for n, p in named if _decays(n, p)] + [n for n, p in named if not _decays(n, p)]  # optimizer order
    if spec.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / spec.steps)))
    else:
        sched = None
    data = BatchStream(task, batch_size, seed)
    running, first, low, start = 0.0, math.nan, math.inf, 0
    if resume is not None:
        if list(resume.param_names) != names:
            raise PrunqError(f"{stage}: the checkpoint's parameters do not match the model's; cannot resume")
        opt.load_state_dict(resume.optimizer)
        if sched is not None and resume.scheduler is not None:
            sched.load_state_dict(resume.scheduler)
        data.seek(*resume.data)
        running, first, low, start = resume.running, resume.first_loss, resume.low, resume.step
        _set_rng_state(resume.rng)
    scale = getattr(task, "loss_scale", None)
    was_training = model.training
    model.train()
    pending: Callable[[], None] | None = None  # a checkpoint waiting for the next loss to pass the guard
    bar = tqdm(range(start, spec.steps), desc=stage, disable=True if quiet else None, leave=False,
               dynamic_ncols=True, initial=start, total=spec.steps)  # fmt: skip
    for t in bar:
        where = (data.epoch, data.index)
        batch = next(data)
        try:
            task.check_batch(batch)
        except PrunqError as e:
            raise PrunqError(f"{stage}: training batch {where[1]} of epoch {where[0]} (step {t}): {e}") from None
        loss = task.loss(model, batch)
        terms = loss_terms(model) if loss_terms is not None else {}
        for term in terms.values():
            loss = loss + term
        value = loss.item()
        if t == 0:
            first = value
        _guard_loss(stage, t, value, low if t else value, scale if scale is not None else first)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        grads = [p.grad for p in params if p.grad is not None]
        if grads and not bool(torch.isfinite(get_total_norm(grads))):
            raise Diverged(f"{stage}: diverged at step {t}: the gradient is not finite; lower the learning rate")
        opt.step()
        if sched is not None:
            sched.step()
        if not bool(torch.isfinite(get_total_norm(params))):
            raise Diverged(f"{stage}: diverged at step {t}: a weight is not finite after the update; lower the learning rate")
        if pending is not None:  # the state before this step gave a finite, sane loss and gradient: keep it
            pending()
            pending = None
        extra = after_step(t) if after_step is not None else None
        running = 0.9 * running + 0.1 * value if t else value
        low = min(low, running)
        if t % log_every == 0 or t == spec.steps - 1 or extra:
            entry = {"stage": stage, "step": t, "loss": running}
            entry.update({k: float(v.detach()) for k, v in terms.items()})
            if extra:
                entry.update(extra)
            history.append(entry)
            bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in entry.items() if k != "stage"})
        if checkpoint is not None and checkpoint_every > 0 and (t + 1) % checkpoint_every == 0 and t + 1 < spec.steps:
            pending = checkpoint(FitState(
                step=t + 1, running=running, first_loss=first, low=low, optimizer=copy.deepcopy(opt.state_dict()),
                param_names=names, scheduler=copy.deepcopy(sched.state_dict()) if sched is not None else None,
                rng=_rng_state(), data=(data.epoch, data.index),
            ))  # fmt: skip
    opt.zero_grad(set_to_none=True)
    model.train(was_training)


def _guard_loss(stage: str, t: int, value: float, low: float, scale: float) -> None:
    if not math.isfinite(value):
        raise Diverged(f"{stage}: diverged at step {t}: the loss is {value}; lower the learning rate")
    ref = max(low, scale)
    if math.isfinite(ref) and ref > 0 and value > DIVERGENCE_FACTOR * ref:
        raise Diverged(
            f"{stage}: diverged at step {t}: the loss {value:.4g} is over {DIVERGENCE_FACTOR:g}x its level "
            f"{ref:.4g}; lower the learning rate"
        )
