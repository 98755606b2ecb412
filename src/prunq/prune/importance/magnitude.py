"""Magnitude: ``|w|`` per element, the L2 norm of a group."""

from __future__ import annotations

import torch

from prunq.prune.granularity import Granularity
from prunq.prune.importance.base import Criterion, register_criterion


@register_criterion
class Magnitude(Criterion):
    """``|w|`` (element) or ``||w_G||_2`` (group)."""

    name = "magnitude"

    def scores(self, name: str, weight: torch.Tensor, gran: Granularity) -> torch.Tensor:  # noqa: D102
        return gran.reduce_norm(weight.detach().float())
