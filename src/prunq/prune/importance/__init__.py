"""Importance criteria: each a small class that turns weights (and gradients) into group scores."""

from __future__ import annotations

from prunq.core.errors import PrunqError
from prunq.prune.importance.base import Criterion
from prunq.prune.importance.fisher import Fisher
from prunq.prune.importance.magnitude import Magnitude
from prunq.prune.importance.random import Random
from prunq.prune.importance.taylor import Taylor

CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (Taylor, Magnitude, Fisher, Random)}

__all__ = ["Criterion", "Taylor", "Magnitude", "Fisher", "Random", "CRITERIA", "get_criterion"]


def get_criterion(name: str, ema: float | None = None, seed: int = 0) -> Criterion:
    """Instantiate a criterion by name (``prune.criterion`` in a recipe)."""
    try:
        cls = CRITERIA[name]
    except KeyError:
        raise PrunqError(f"prune.criterion: unknown criterion {name!r} (choose from {', '.join(CRITERIA)})") from None
    return cls(ema=ema, seed=seed)
