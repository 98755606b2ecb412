"""What a compression method is to the runner: a small protocol over a training loop, and its registry.

torchao's pattern: a new method is a config class (a :class:`~prunq.core.config.MethodConfig`), one module
and one registration; the entry points (``prunq.compress``, ``prunq sweep``, the benchmarks) never change.

>>> from typing import Literal
>>> from prunq.core.config import MethodConfig
>>> class NoopConfig(MethodConfig):
...     kind: Literal["noop-doc"] = "noop-doc"
>>> @register_method(NoopConfig)
... class Noop(MethodBase):
...     stage = "noop"
>>> type(build_method(NoopConfig())).__name__, config_type("noop-doc") is NoopConfig
('Noop', True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from prunq.core.config import MethodConfig
from prunq.core.errors import PrunqError


@dataclass(frozen=True)
class Transform:
    """One entry of a run's manifest: an operation name and its JSON-safe arguments.

    ``prunq.load`` replays the entries in order through a fixed map of operation names to functions
    (:mod:`prunq.core.manifest`); a name read from a file never reaches an import.
    """

    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"op": self.op, **self.args}


@dataclass
class RunContext:
    """What a method may use from the run: the task's data and loss, seeds, a place to log.

    ``task`` is any object with the :class:`prunq.tasks.Task` interface (core does not import tasks).
    ``seed`` is the recipe's seed; ``position`` the method's index in the recipe (the runner fine-tunes
    method ``i`` with data order ``seed + 1 + i``, so two methods never share one). ``validate`` measures the selection metric on the task's validation split — never the
    test split: a method that selects (a search, a budget tuner) must use it.
    """

    task: Any
    seed: int
    batch_size: int
    position: int = 0
    history: list[dict] = field(default_factory=list)
    quiet: bool = False
    eval_every: int = 0
    validate: Callable[[nn.Module], float] | None = None
    example_inputs: tuple = ()


@runtime_checkable
class Method(Protocol):
    """The hooks a method offers a training loop. Methods with no training simply have no steps."""

    config: MethodConfig
    #: Name of the method's stage in the history and in ``metrics.json`` (``"prune"``, ``"quant"``, ...).
    stage: str
    #: True when the method removes weights (``metrics["pruned"]`` is the model after the last such method).
    prunes: bool

    def attach(self, model: nn.Module, ctx: RunContext) -> None:
        """Put the method's state on the model (masks, quantizers, gates) and run any scoring pass."""

    def loss_terms(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Extra loss terms added to the task loss at every step (e.g. a bit-operations budget)."""

    def after_backward(self) -> None:
        """Between backward and the optimizer step (gradient statistics)."""

    def after_step(self, t: int) -> dict | None:
        """After optimizer step ``t`` (schedules); a dict returned is merged into that step's log."""

    def finalize(self, model: nn.Module, ctx: RunContext) -> list[Transform]:
        """End of the method: freeze what must be frozen; return the transforms for the manifest."""

    def state_dict(self) -> dict[str, Any] | None:
        """The method's state outside the model (schedule position, score statistics) for a checkpoint in
        the middle of its fine-tuning: tensors, numbers, strings, lists and dicts. ``None``: the method
        cannot be checkpointed mid-way, and a resumed run restarts it from its beginning."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, after :meth:`attach` on the same starting weights."""


class MethodBase:
    """Do-nothing defaults for every hook, so a method defines only what it needs."""

    stage: str = "method"
    prunes: bool = False

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def attach(self, model: nn.Module, ctx: RunContext) -> None:  # noqa: D102
        pass

    def loss_terms(self, model: nn.Module) -> dict[str, torch.Tensor]:  # noqa: D102
        return {}

    def after_backward(self) -> None:  # noqa: D102
        pass

    def after_step(self, t: int) -> dict | None:  # noqa: D102
        return None

    def finalize(self, model: nn.Module, ctx: RunContext) -> list[Transform]:  # noqa: D102
        return []

    def state_dict(self) -> dict[str, Any] | None:  # noqa: D102
        return None  # unknown: a resume restarts the method (safe for any method)

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        pass


#: config type -> method class (torchao's registry keyed by config type).
METHODS: dict[type[MethodConfig], type] = {}
#: the ``kind`` a recipe writes -> config type.
KINDS: dict[str, type[MethodConfig]] = {}


def _kind_of(config_type: type[MethodConfig]) -> str:
    f = config_type.model_fields.get("kind")
    if f is None or not isinstance(f.default, str) or not f.default:
        raise TypeError(f"{config_type.__name__} needs `kind: Literal['<name>'] = '<name>'`")
    return f.default


def register_method(config_type: type[MethodConfig]) -> Callable[[type], type]:
    """Class decorator: ``@register_method(MyConfig) class MyMethod(MethodBase): ...``.

    Registering the same kind again replaces the earlier entry (tests and notebooks redefine classes).
    """
    if not (isinstance(config_type, type) and issubclass(config_type, MethodConfig)):
        raise TypeError("register_method takes a MethodConfig subclass")
    kind = _kind_of(config_type)

    def deco(cls: type) -> type:
        old = KINDS.get(kind)
        if old is not None:
            METHODS.pop(old, None)
        KINDS[kind] = config_type
        METHODS[config_type] = cls
        return cls

    return deco


def config_type(kind: str) -> type[MethodConfig]:
    """The config class registered for ``kind``; an unknown kind is a :class:`PrunqError`.

    The built-in methods register when :mod:`prunq.methods` is imported (the pipeline does).
    """
    try:
        return KINDS[kind]
    except KeyError:
        raise PrunqError(f"unknown method kind {kind!r} (choose from {', '.join(sorted(KINDS))})") from None


def build_method(config: MethodConfig) -> MethodBase:
    """The method object for a config (dispatch on ``type(config)``, never on a string)."""
    cls = METHODS.get(type(config))
    if cls is None:
        raise PrunqError(f"no method registered for {type(config).__name__}")
    return cls(config)
