"""Importance criteria: each a small class that turns weights (and gradients) into group scores.

Criteria are registered by name (:data:`CRITERIA`); a mapping of names to weights builds a
:class:`~prunq.prune.importance.blend.Blend`, which is a criterion too.

>>> type(get_criterion("taylor")).__name__, type(get_criterion({"taylor": 0.7, "magnitude": 0.3})).__name__
('Taylor', 'Blend')
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from prunq.core.errors import PrunqError
from prunq.prune.importance.base import CRITERIA, Criterion, register_criterion
from prunq.prune.importance.blend import Blend
from prunq.prune.importance.fisher import Fisher
from prunq.prune.importance.magnitude import Magnitude
from prunq.prune.importance.random import Random
from prunq.prune.importance.taylor import Taylor

#: A recipe's ``criterion``: a registered name, or a mapping name -> weight (a blend).
CriterionSpec = str | Mapping[str, float]

__all__ = [
    "Blend", "CRITERIA", "Criterion", "CriterionSpec", "Fisher", "Magnitude", "Random", "Taylor",
    "check_criterion", "get_criterion", "needs_grad", "register_criterion",
]  # fmt: skip


def check_criterion(spec: object) -> CriterionSpec:
    """Return ``spec`` if it names registered criteria (a name, or names -> finite weights >= 0 with at
    least one > 0); otherwise raise ``ValueError`` saying why (the config adds the field name)."""
    choose = f"choose from {', '.join(CRITERIA)}"
    if isinstance(spec, str):
        if spec not in CRITERIA:
            raise ValueError(f"unknown criterion {spec!r} ({choose})")
        return spec
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"expected a criterion name or a non-empty mapping name -> weight ({choose})")
    for name, w in spec.items():
        if name not in CRITERIA:
            raise ValueError(f"unknown criterion {name!r} in the blend ({choose})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"the weight of {name!r} must be a finite number >= 0, got {w!r}")
    if not any(w > 0 for w in spec.values()):
        raise ValueError("a blend needs at least one weight > 0")
    return spec


def needs_grad(spec: CriterionSpec) -> bool:
    """Whether the criterion ``spec`` needs gradient statistics (a blend: any member with weight > 0)."""
    if isinstance(spec, str):
        return CRITERIA[spec].needs_grad
    return any(CRITERIA[n].needs_grad for n, w in spec.items() if w > 0)


def get_criterion(spec: CriterionSpec, ema: float | None = None, seed: int = 0) -> Criterion:
    """Instantiate a criterion from a name (``"taylor"``) or a blend mapping (``{"taylor": 0.7, ...}``)."""
    try:
        check_criterion(spec)
    except ValueError as e:
        raise PrunqError(f"prune.criterion: {e}") from None
    if isinstance(spec, str):
        return CRITERIA[spec](ema=ema, seed=seed)
    return Blend({CRITERIA[n](ema=ema, seed=seed): float(w) for n, w in spec.items()})
