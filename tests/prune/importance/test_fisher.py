"""The diagonal Fisher score ``w^2 E[g^2] / 2`` against a hand computation.

W = [[1, 2], [-3, 0.5]], two batches of gradients:
    g1 = [[1, 1], [0, 2]], g2 = [[3, 0], [2, 2]]
    E[g^2] = [[(1 + 9)/2, (1 + 0)/2], [(0 + 4)/2, (4 + 4)/2]] = [[5, 0.5], [2, 4]]
    element scores w^2 E[g^2] / 2 = [[2.5, 1.0], [9.0, 0.5]]
    channel scores (row sums) = [3.5, 9.5]
"""

import pytest
import torch
from torch import nn

from prunq.prune import masks as M
from prunq.prune.importance import Fisher, get_criterion
from prunq.prune.pruner import PruneConfig, Pruner

W = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
GRADS = (torch.tensor([[1.0, 1.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [2.0, 2.0]]))


def _pruner(**kw):
    net = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(W)
    cfg = dict(criterion="fisher", mode="hard", schedule="one_shot", min_density=0, min_per_channel=0)
    cfg.update(kw)
    p = Pruner(net, PruneConfig(**cfg))
    for g in GRADS:
        M.original(net[0]).grad = g.clone()
        p.accumulate()
    return net, p


def test_element_and_channel_scores_match_hand_computation():
    _, p = _pruner()
    assert isinstance(p.criterion, Fisher) and p.criterion.needs_grad
    assert torch.allclose(p.criterion.scores("0", W, p.gran), torch.tensor([[2.5, 1.0], [9.0, 0.5]]))
    _, p = _pruner(granularity="channel")
    assert torch.allclose(p.criterion.scores("0", W, p.gran), torch.tensor([3.5, 9.5]))


def test_fisher_cut_keeps_the_two_largest_saliencies():
    net, p = _pruner()
    assert p.prune(0.5) == 0.5
    assert M.get_mask(net[0]).mask.tolist() == [[1, 0], [1, 0]]  # 2.5 and 9.0


def test_scores_use_the_current_weights():
    # the statistic is E[g^2] only; moving the weight changes the score without new gradients
    _, p = _pruner()
    assert torch.allclose(p.criterion.scores("0", 2 * W, p.gran), 4 * torch.tensor([[2.5, 1.0], [9.0, 0.5]]))


def test_fisher_needs_gradients_and_resets_after_a_cut():
    crit = get_criterion("fisher")
    with pytest.raises(RuntimeError, match="accumulate"):
        crit.scores("0", W, PruneConfig().gran)
    _, p = _pruner()
    p.prune(0.5)
    with pytest.raises(RuntimeError, match="accumulate"):
        p.criterion.scores("0", W, p.gran)
