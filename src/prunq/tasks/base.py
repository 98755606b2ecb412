"""What the pipeline needs from a task: data, a loss, a metric, a model zoo.

A task is a small object; the pipeline never looks inside a batch. A batch is whatever the task's
loaders yield (a tuple of tensors); :meth:`Task.loss` and :meth:`Task.evaluate` interpret it.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn


class Task(ABC):
    """A compression target: data, a loss to fine-tune with, and the metric to report.

    Subclasses set ``name``, ``metric_name`` and ``higher_is_better`` and implement the methods.
    """

    name: str
    metric_name: str
    higher_is_better: bool = True
    #: Examples in :meth:`example_inputs`, for the cost model's per-example MACs. None: the first input's
    #: leading dimension; a task whose inputs are sequence-first ``(T, B, D)`` sets it (to 1, say).
    example_batch_size: int | None = None

    @property
    def loss_scale(self) -> float | None:
        """The loss of an uninformed model (e.g. ln(classes) for cross-entropy): the floor of the
        divergence guard's reference level (:func:`prunq.pipeline.training.fit`). None: the stage's first
        loss serves instead."""
        return None

    def check_batch(self, batch: tuple[torch.Tensor, ...]) -> None:
        """Refuse a training batch the loss cannot use; the default: every floating tensor is finite.

        Raises :class:`~prunq.core.errors.PrunqError` naming the tensor; the runner adds the batch's place.
        """
        from prunq.core.errors import PrunqError

        for i, t in enumerate(batch):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise PrunqError(f"tensor {i} of the batch holds NaN or inf (the data, not the learning rate)")

    @abstractmethod
    def build_model(self, name: str, **kwargs: Any) -> nn.Module:
        """A fresh (untrained) model from this task's zoo; unknown ``name`` raises PrunqError."""

    @abstractmethod
    def train_batches(self, batch_size: int, seed: int) -> Iterable[tuple[torch.Tensor, ...]]:
        """One shuffled epoch of training batches (a new shuffle for each ``seed``)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The fine-tuning loss of ``model`` on ``batch`` (a scalar, differentiable)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Metrics on the test split; ``{"metric": float, ...}`` with ``metric`` the task's headline."""

    def validate(self, model: nn.Module) -> dict[str, Any]:
        """Metrics on the task's *selection* split — never the test split: what a method that selects
        (a search over criteria, a budget tuner) and the runner's periodic logging use.
        ``{"metric": float, ...}``. Tasks without one raise :class:`~prunq.core.errors.PrunqError`."""
        from prunq.core.errors import PrunqError

        raise PrunqError(f"task {self.name!r} has no validation split")

    @abstractmethod
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Positional inputs for one forward at batch size 1 (used to count MACs; see ``example_batch_size``)."""

    def model_kwargs(self, name: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """The keyword arguments :meth:`build_model` gives the zoo, with the task's defaults filled in
        (what a run records so that :func:`prunq.load` rebuilds the same model without the task)."""
        return dict(kwargs)

    def previews(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Small model outputs worth showing in a report (e.g. a predicted depth map), keyed by name.

        Called on the dense and on the compressed model; the run keeps them in ``previews.safetensors``
        and :func:`prunq.tasks.render_previews` draws them. Default: none.
        """
        return {}

    def calibration_batches(self, n: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
        """``n`` training batches for calibration and scoring (default: the first of an epoch), each
        checked by :meth:`check_batch` (an error names the batch)."""
        from prunq.core.errors import PrunqError

        out: list[tuple[torch.Tensor, ...]] = []
        for batch in self.train_batches(batch_size, seed):
            try:
                self.check_batch(batch)
            except PrunqError as e:
                raise PrunqError(f"calibration batch {len(out)} (seed {seed}): {e}") from None
            out.append(batch)
            if len(out) >= n:
                break
        return out


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode under ``no_grad`` for the block; every submodule's train/eval flag is restored after.

    >>> m = nn.Sequential(nn.BatchNorm1d(2)).train()
    >>> with inference(m): print(m.training, torch.is_grad_enabled())
    False False
    >>> m.training
    True
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, was_training in modes:
            m.training = was_training


#: The most parameters a zoo model may have: a recipe or manifest asking for more (``width: 100000``) is
#: refused before anything is allocated (10^8 float32 weights are 400 MB, several times that to train).
MAX_PARAMETERS = 10**8


def build_from_zoo(zoo: dict[str, Any], name: str, **kwargs: Any) -> nn.Module:
    """``zoo[name](**kwargs)``; an unknown name or argument is a :class:`~prunq.core.errors.PrunqError`.

    The model is first built on the ``meta`` device (shapes only, no memory, no random numbers drawn):
    one with more than :data:`MAX_PARAMETERS` parameters is refused, naming the arguments. Each factory
    checks its own arguments' types and ranges (``model.kwargs.<name>: ...``)."""
    import inspect

    from prunq.core.errors import PrunqError

    if not isinstance(name, str) or name not in zoo:
        raise PrunqError(f"model.name: unknown model {name!r} (choose from {', '.join(zoo)})")
    factory = zoo[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        allowed = ", ".join(inspect.signature(factory).parameters)
        raise PrunqError(f"model: {name} does not take these arguments ({exc}); allowed: {allowed}") from None
    try:
        with torch.device("meta"):
            shape = factory(**kwargs)
    except (RuntimeError, OverflowError, MemoryError, ValueError) as exc:
        if isinstance(exc, PrunqError):
            raise
        first = (str(exc).splitlines() or [""])[0][:150]
        raise PrunqError(f"model.kwargs: {name}{_call(kwargs)} cannot be built ({type(exc).__name__}: {first})") from None
    n = sum(p.numel() for p in shape.parameters())
    if n > MAX_PARAMETERS:
        # Name the argument that grew the model when there is one (a number above its default).
        params = inspect.signature(factory).parameters
        grown = [k for k, v in kwargs.items() if _number(v) and _number(params[k].default) and v > params[k].default]
        field = f"model.kwargs.{grown[0]}: {kwargs[grown[0]]!r}" if len(grown) == 1 else f"model.kwargs: {name}{_call(kwargs)}"
        raise PrunqError(f"{field} builds a model of {n:,} parameters, over the limit of {MAX_PARAMETERS:,}")
    return factory(**kwargs)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _call(kwargs: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"({text if len(text) <= 120 else text[:119] + '…'})"
