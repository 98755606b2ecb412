"""First-order Taylor score (the default criterion).

Removing weight ``w_i`` changes the loss by about ``-g_i w_i``; the element score is
``mean over batches (w_i g_i)^2`` and the group score ``mean over batches (sum_{i in G} w_i g_i)^2``
(METHOD.md §2). ``g`` is the gradient with respect to the *effective* weight; in soft mode the
shadow weight receives exactly that gradient, so a pruned weight's score is ``(w_shadow g)^2`` and can
rise again.
"""

from __future__ import annotations

import torch

from prunq.prune.granularity import Granularity
from prunq.prune.importance.base import Criterion, register_criterion


@register_criterion
class Taylor(Criterion):
    """``S_G = E_batches[(Σ_{i∈G} w_i g_i)^2]``."""

    name = "taylor"
    needs_grad = True

    def contribution(self, weight: torch.Tensor, grad: torch.Tensor, gran: Granularity) -> torch.Tensor:  # noqa: D102
        return gran.reduce_sum(weight * grad).pow(2)

    def scores(self, name: str, weight: torch.Tensor, gran: Granularity) -> torch.Tensor:  # noqa: D102
        return self.accumulated(name)
