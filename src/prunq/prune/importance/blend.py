"""A weighted blend of criteria, itself a criterion (``prune.criterion: {taylor: 0.7, magnitude: 0.3}``).

Members speak different units (``|w|`` against ``(w g)^2``, which differ by orders of magnitude and by
layer), so a raw weighted sum would be decided by whichever member happens to be largest. Each member's
scores are therefore divided by their mean over the tensor's groups before weighting:

    ``S_G = sum_c  weight_c * s_c,G / mean_G'(s_c,G')``

Normalising per tensor (not over the whole network) keeps every member's order inside a layer and makes
the weights mean what they say in every layer. The price, with ``global`` allocation: each member's
between-layer scale is removed (every layer has mean blended score ``sum_c weight_c``), so the ranking
compares a weight's importance *relative to its layer*; the per-tensor floor and ``cost_exponent`` still
act as usual. A member whose scores are all zero (or non-finite on average) contributes nothing.

>>> from prunq.prune.importance.magnitude import Magnitude
>>> from prunq.prune.granularity import Granularity
>>> b = Blend({Magnitude(): 1.0})
>>> b.scores("fc", torch.tensor([[1.0, -3.0]]), Granularity.parse("element")).tolist()
[[0.5, 1.5]]
"""

from __future__ import annotations

import math

import torch

from prunq.prune.granularity import Granularity
from prunq.prune.importance.base import Criterion


class Blend(Criterion):
    """``criteria`` maps each member (an instance) to its weight (>= 0, at least one > 0)."""

    name = "blend"

    def __init__(self, criteria: dict[Criterion, float]) -> None:
        members = {c: float(w) for c, w in criteria.items() if float(w) != 0.0}
        if not members or any(not math.isfinite(w) or w < 0 for w in members.values()):
            raise ValueError("a blend needs finite weights >= 0, at least one of them > 0")
        super().__init__()
        self.criteria = members

    @property
    def needs_grad(self) -> bool:  # type: ignore[override]  # noqa: D102
        return any(c.needs_grad for c in self.criteria)

    @property
    def ema(self) -> float | None:  # noqa: D102
        # The pruner resets the statistics after a cut unless they are an EMA: only when every member's are.
        emas = {c.ema for c in self.criteria if c.needs_grad}
        return emas.pop() if len(emas) == 1 else None

    @ema.setter
    def ema(self, value: float | None) -> None:
        pass  # members carry their own EMA

    @torch.no_grad()
    def accumulate(self, name: str, weight: torch.Tensor, grad: torch.Tensor, gran: Granularity) -> None:  # noqa: D102
        for c in self.criteria:
            if c.needs_grad:
                c.accumulate(name, weight, grad, gran)

    def batches_seen(self, name: str) -> int:  # noqa: D102
        return max((c.batches_seen(name) for c in self.criteria if c.needs_grad), default=0)

    def reset(self) -> None:  # noqa: D102
        for c in self.criteria:
            c.reset()

    def scores(self, name: str, weight: torch.Tensor, gran: Granularity) -> torch.Tensor:  # noqa: D102
        total: torch.Tensor | None = None
        for c, w in self.criteria.items():
            s = c.scores(name, weight, gran).float()
            mean = s.mean()
            part = s * (w / mean) if torch.isfinite(mean) and mean > 0 else torch.zeros_like(s)
            total = part if total is None else total + part
        assert total is not None
        return total

    def state_dict(self) -> dict:  # noqa: D102
        return {"members": [c.state_dict() for c in self.criteria]}

    def load_state_dict(self, state: dict) -> None:  # noqa: D102
        for c, s in zip(self.criteria, state.get("members", [])):
            c.load_state_dict(s)
