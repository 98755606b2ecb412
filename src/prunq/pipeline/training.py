"""A small, generic fine-tuning loop with hooks: what the pipeline uses for every stage."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

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


def make_optimizer(params, spec) -> torch.optim.Optimizer:
    """The optimizer a :class:`~prunq.pipeline.recipes.TrainSpec` names."""
    params = [p for p in params if p.requires_grad]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=True
        )
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)


def fit(
    model: nn.Module,
    task: Task,
    spec,
    *,
    batch_size: int,
    seed: int,
    stage: str,
    after_backward: Callable[[], None] | None = None,
    after_step: Callable[[int], dict | None] | None = None,
    history: list[dict] | None = None,
    log_every: int = 25,
    quiet: bool = False,
) -> list[dict]:
    """Run ``spec.steps`` optimizer steps of ``task.loss`` on ``model``.

    ``after_backward()`` runs between backward and the optimizer step (gradient statistics);
    ``after_step(t)`` after it (schedules); a dict it returns is merged into the log line of that step.
    The history gets one entry every ``log_every`` steps: ``{"stage", "step", "loss", ...}``.
    """
    history = [] if history is None else history
    if spec.steps <= 0:
        return history
    torch.manual_seed(seed)
    opt = make_optimizer(model.parameters(), spec)
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
            if extra:
                entry.update(extra)
            history.append(entry)
            bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in entry.items() if k != "stage"})
    opt.zero_grad(set_to_none=True)
    model.train(was_training)
    return history
