"""Pruning schedules: pure functions from a training step to a target sparsity.

* ``one_shot`` -- the final sparsity at ``begin``.
* ``iterative`` -- ``K`` pruning steps evenly spaced in ``[begin, end]``, the kept fraction shrinking
  geometrically: ``s_k = 1 - (1 - s)^(k/K)``, ``k = 1..K``.
* ``gradual`` -- Zhu & Gupta's cubic schedule ``s_t = s_f + (s_0 - s_f)(1 - (t - t_0)/T)^3`` with
  ``T = end - begin``, the mask updated every ``frequency`` steps and at ``end``.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunq.core.errors import PrunqError

KINDS = ("one_shot", "iterative", "gradual")


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
        if self.kind not in KINDS:
            raise PrunqError(f"prune.schedule: unknown schedule {self.kind!r} (choose from {', '.join(KINDS)})")
        if not 0.0 <= self.sparsity < 1.0:
            raise PrunqError(f"prune.sparsity: {self.sparsity} is outside [0, 1)")
        if not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise PrunqError("prune.initial_sparsity: must be in [0, sparsity]")
        if self.begin < 0 or self.end < self.begin:
            raise PrunqError(f"prune.end: the pruning window [{self.begin}, {self.end}] is empty or negative")
        if self.iterations < 1:
            raise PrunqError("prune.iterations: must be >= 1")
        if self.frequency < 1:
            raise PrunqError("prune.frequency: must be >= 1")

    def update_steps(self) -> list[int]:
        """The steps at which masks are recomputed, ascending, the last one reaching ``sparsity``."""
        if self.kind == "one_shot":
            return [self.begin]
        if self.kind == "iterative":
            span = self.end - self.begin
            steps = [self.begin + (k * span) // self.iterations for k in range(self.iterations)]
            return sorted(set(steps))
        steps = list(range(self.begin, self.end + 1, self.frequency))
        if steps[-1] != self.end:
            steps.append(self.end)
        return steps

    def target(self, t: int) -> float:
        """Target sparsity at step ``t`` (0 before the first update step)."""
        ups = self.update_steps()
        if t < ups[0]:
            return 0.0 if self.kind != "gradual" else self.initial_sparsity
        if self.kind == "one_shot":
            return self.sparsity
        if self.kind == "iterative":
            k = sum(1 for u in ups if u <= t)
            return 1.0 - (1.0 - self.sparsity) ** (k / len(ups))
        span = max(self.end - self.begin, 1)
        frac = min(max((t - self.begin) / span, 0.0), 1.0)
        if t >= self.end:
            frac = 1.0
        return self.sparsity + (self.initial_sparsity - self.sparsity) * (1.0 - frac) ** 3
