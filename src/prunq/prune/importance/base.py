"""The criterion interface: turn weights (and, for some, gradients) into group scores."""

from __future__ import annotations

from typing import ClassVar, TypeVar

import torch

from prunq.core.config import check_ema
from prunq.prune.granularity import Granularity

#: Every criterion that can be built from its name alone (``prune.criterion: taylor``).
CRITERIA: dict[str, type[Criterion]] = {}

_T = TypeVar("_T", bound="type[Criterion]")


def register_criterion(cls: _T) -> _T:
    """Class decorator: make ``cls`` available to recipes under ``cls.name``."""
    CRITERIA[cls.name] = cls
    return cls


class Criterion:
    """Scores pruning groups; higher = more important = kept.

    Gradient-based criteria (``needs_grad``) accumulate one contribution per batch through
    :meth:`accumulate`; the score is the mean since the last :meth:`reset` or, with ``ema`` set, an
    exponential moving average. All tensors are canonical (``(out, in_per_group, *kernel)``).
    """

    name: ClassVar[str] = ""
    #: True when scores need :meth:`accumulate` (gradient statistics); a blend decides per instance.
    needs_grad: bool = False

    def __init__(self, ema: float | None = None, seed: int = 0) -> None:
        self.ema = None if ema is None else check_ema(ema, "prune.ema")
        self.seed = seed
        self._acc: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    # -- accumulation (gradient-based criteria) ---------------------------------------------------
    def contribution(self, weight: torch.Tensor, grad: torch.Tensor, gran: Granularity) -> torch.Tensor:
        """One batch's contribution to the group score (gradient-based criteria override)."""
        raise NotImplementedError

    @torch.no_grad()
    def accumulate(self, name: str, weight: torch.Tensor, grad: torch.Tensor, gran: Granularity) -> None:
        """Fold one batch's gradient into the running score of tensor ``name``."""
        if not self.needs_grad:
            return
        x = self.contribution(weight.detach(), grad.detach(), gran).float()
        prev = self._acc.get(name)
        if prev is None:
            self._acc[name] = x.clone()
        elif self.ema is None:
            prev.add_(x)
        else:
            prev.mul_(self.ema).add_(x, alpha=1.0 - self.ema)
        self._count[name] = self._count.get(name, 0) + 1

    def batches_seen(self, name: str) -> int:
        """How many batches have been accumulated for ``name`` since the last reset."""
        return self._count.get(name, 0)

    def accumulated(self, name: str) -> torch.Tensor:
        """The accumulated statistic (mean or EMA) for ``name``."""
        if name not in self._acc:
            raise RuntimeError(
                f"criterion {self.name!r} has no gradient statistics for {name!r}: "
                "run forward/backward and Pruner.accumulate() before pruning"
            )
        acc = self._acc[name]
        return acc if self.ema is not None else acc / self._count[name]

    def reset(self) -> None:
        """Forget accumulated statistics (the mean restarts; an EMA is kept unless reset)."""
        self._acc.clear()
        self._count.clear()

    # -- scores ---------------------------------------------------------------------------------
    def scores(self, name: str, weight: torch.Tensor, gran: Granularity) -> torch.Tensor:
        """Group scores for tensor ``name`` (shape ``gran.group_shape(weight.shape)``)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Accumulators, for checkpointing a pruner mid-schedule."""
        return {"acc": {k: v.clone() for k, v in self._acc.items()}, "count": dict(self._count)}

    def load_state_dict(self, state: dict) -> None:  # noqa: D102
        self._acc = {k: v.clone() for k, v in state.get("acc", {}).items()}
        self._count = dict(state.get("count", {}))
