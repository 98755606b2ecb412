"""Pruning schedules: pure functions from a training step to a target sparsity.

* ``one_shot`` -- the final sparsity at ``begin``.
* ``iterative`` -- ``K`` pruning steps evenly spaced in ``[begin, end]``, the kept fraction shrinking
  geometrically: ``s_k = 1 - (1 - s)^(k/K)``, ``k = 1..K``.
* ``gradual`` -- Zhu & Gupta's cubic schedule ``s_t = s_f + (s_0 - s_f)(1 - (t - t_0)/T)^3`` with
  ``T = end - begin``, the mask updated every ``frequency`` steps and at ``end``.

Each kind is a small class registered in :data:`SCHEDULES`. The validation rules live here once, as
functions that both :class:`Schedule` and :class:`~prunq.prune.pruner.PruneConfig` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunq.core.config import check_sparsity
from prunq.core.errors import PrunqError


# -- the rules (one place) ----------------------------------------------------------------------------
def check_schedule_kind(kind: object) -> str:
    """Return ``kind`` if it is a registered schedule, else raise :class:`PrunqError` naming the field."""
    if kind not in SCHEDULES:
        raise PrunqError(f"prune.schedule: unknown schedule {kind!r} (choose from {', '.join(SCHEDULES)})")
    return str(kind)


def check_window(begin: float, end: float) -> None:
    """``0 <= begin <= end`` (fractions of a run in a config, steps in a :class:`Schedule`)."""
    if begin < 0:
        raise PrunqError(f"prune.begin: {begin} is negative")
    if end < begin:
        raise PrunqError(f"prune.end: begin ({begin}) is after end ({end})")


def check_initial_sparsity(initial: float, sparsity: float) -> None:
    """``0 <= initial_sparsity <= sparsity``."""
    if not 0.0 <= initial <= sparsity:
        raise PrunqError(f"prune.initial_sparsity: {initial} must be in [0, sparsity = {sparsity}]")


def check_count(value: int, field: str) -> int:
    """A count that must be at least 1 (``iterations``, ``frequency``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunqError(f"prune.{field}: {value!r} must be an integer >= 1")
    return value


# -- the maths --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """When to cut masks and to what sparsity; steps count completed optimizer steps.

    >>> s = Schedule("iterative", sparsity=0.99, begin=0, end=30, iterations=2)
    >>> s.update_steps()
    [0, 15]
    >>> round(s.target(0), 4), round(s.target(15), 4)
    (0.9, 0.99)
    """

    kind: str
    sparsity: float
    begin: int = 0
    end: int = 0
    iterations: int = 5
    frequency: int = 10
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        check_schedule_kind(self.kind)
        check_sparsity(self.sparsity, "prune.sparsity")
        check_initial_sparsity(self.initial_sparsity, self.sparsity)
        check_window(self.begin, self.end)
        check_count(self.iterations, "iterations")
        check_count(self.frequency, "frequency")

    def update_steps(self) -> list[int]:
        """The steps at which masks are recomputed, ascending, the last one reaching ``sparsity``."""
        return SCHEDULES[self.kind].update_steps(self)

    def target(self, t: int) -> float:
        """Target sparsity at step ``t`` (before the first update step: 0, ``initial_sparsity`` if gradual)."""
        kind = SCHEDULES[self.kind]
        ups = self.update_steps()
        if t < ups[0]:
            return kind.before(self)
        return kind.target(self, t, ups)


class _Kind:
    name: ClassVar[str]

    @staticmethod
    def update_steps(s: Schedule) -> list[int]:
        return [s.begin]

    @staticmethod
    def before(s: Schedule) -> float:
        return 0.0

    @staticmethod
    def target(s: Schedule, t: int, ups: list[int]) -> float:
        return s.sparsity


class _OneShot(_Kind):
    name = "one_shot"


class _Iterative(_Kind):
    name = "iterative"

    @staticmethod
    def update_steps(s: Schedule) -> list[int]:
        span = s.end - s.begin
        return sorted({s.begin + (k * span) // s.iterations for k in range(s.iterations)})

    @staticmethod
    def target(s: Schedule, t: int, ups: list[int]) -> float:
        k = sum(1 for u in ups if u <= t)
        return 1.0 - (1.0 - s.sparsity) ** (k / len(ups))


class _Gradual(_Kind):
    name = "gradual"

    @staticmethod
    def update_steps(s: Schedule) -> list[int]:
        steps = list(range(s.begin, s.end + 1, s.frequency))
        if steps[-1] != s.end:
            steps.append(s.end)
        return steps

    @staticmethod
    def before(s: Schedule) -> float:
        return s.initial_sparsity

    @staticmethod
    def target(s: Schedule, t: int, ups: list[int]) -> float:
        span = max(s.end - s.begin, 1)
        frac = 1.0 if t >= s.end else min(max((t - s.begin) / span, 0.0), 1.0)
        return s.sparsity + (s.initial_sparsity - s.sparsity) * (1.0 - frac) ** 3


#: Every schedule kind, by name.
SCHEDULES: dict[str, type[_Kind]] = {k.name: k for k in (_OneShot, _Iterative, _Gradual)}
#: The schedule names (kept for readers of the old constant).
KINDS: tuple[str, ...] = tuple(SCHEDULES)

__all__ = ["KINDS", "SCHEDULES", "Schedule", "check_count", "check_initial_sparsity", "check_schedule_kind",
           "check_window"]  # fmt: skip
