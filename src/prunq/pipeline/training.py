"""A small, generic fine-tuning loop with hooks: what the pipeline uses for every stage."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from prunq.tasks.base import Task


def batches_forever(task: Task, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Cycle through shuffled epochs, a new shuffle (seed + epoch) each time."""
    epoch = 0
    while True:
        n = 0
        for batch in task.train_batches(batch_size, seed + epoch):
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError(f"task {task.name!r} yielded no training batch")
        epoch += 1


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
) -> list[dict]:
    """Run ``spec.steps`` optimizer steps of ``task.loss`` (+ any extra loss terms) on ``model``.

    ``hooks`` (a method) or the single callables: ``loss_terms(model)`` returns named terms added to the
    task loss (logged by name); ``after_backward()`` runs between backward and the optimizer step
    (gradient statistics); ``after_step(t)`` after it (schedules); a dict it returns is merged into the
    log line of that step. The history gets one entry every ``log_every`` steps:
    ``{"stage", "step", "loss", ...}``. The global RNG is seeded with ``seed`` for the run (dropout,
    augmentation) and restored afterwards: a library call does not reseed the caller's process.
    """
    history = [] if history is None else history
    if spec.steps <= 0:
        return history
    if hooks is not None:
        loss_terms, after_backward, after_step = hooks.loss_terms, hooks.after_backward, hooks.after_step
    with torch.random.fork_rng(devices=rng_devices()):
        torch.manual_seed(seed)
        _fit(model, task, spec, batch_size, seed, stage, after_backward, after_step, loss_terms, history, log_every, quiet)
    return history


def _fit(model, task, spec, batch_size, seed, stage, after_backward, after_step, loss_terms, history, log_every, quiet):
    opt = make_optimizer(model.named_parameters(), spec)
    if spec.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / spec.steps)))
    else:
        sched = None
    data = batches_forever(task, batch_size, seed)
    was_training = model.training
    model.train()
    running = 0.0
    bar = tqdm(range(spec.steps), desc=stage, disable=True if quiet else None, leave=False, dynamic_ncols=True)
    for t in bar:
        batch = next(data)
        loss = task.loss(model, batch)
        terms = loss_terms(model) if loss_terms is not None else {}
        for term in terms.values():
            loss = loss + term
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage}: loss is {loss.item()} at step {t}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        if sched is not None:
            sched.step()
        extra = after_step(t) if after_step is not None else None
        running = 0.9 * running + 0.1 * loss.item() if t else loss.item()
        if t % log_every == 0 or t == spec.steps - 1 or extra:
            entry = {"stage": stage, "step": t, "loss": running}
            entry.update({k: float(v.detach()) for k, v in terms.items()})
            if extra:
                entry.update(extra)
            history.append(entry)
            bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in entry.items() if k != "stage"})
    opt.zero_grad(set_to_none=True)
    model.train(was_training)
