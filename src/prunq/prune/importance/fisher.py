"""Diagonal Fisher (second-order) saliency: ``w_i^2 E[g_i^2] / 2``, summed over a group."""

from __future__ import annotations

import torch

from prunq.prune.granularity import Granularity
from prunq.prune.importance.base import Criterion, register_criterion


@register_criterion
class Fisher(Criterion):
    """Accumulates ``E[g^2]`` per weight; scores with the current weights."""

    name = "fisher"
    needs_grad = True

    def contribution(self, weight: torch.Tensor, grad: torch.Tensor, gran: Granularity) -> torch.Tensor:  # noqa: D102
        return grad * grad

    def scores(self, name: str, weight: torch.Tensor, gran: Granularity) -> torch.Tensor:  # noqa: D102
        return gran.reduce_sum(weight.detach().float().pow(2) * self.accumulated(name) / 2)
