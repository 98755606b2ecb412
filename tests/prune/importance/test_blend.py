"""A blend of criteria is a criterion: per-layer mean-normalised scores, weighted.

Layer W = [[1, 2], [3, 4]] with one batch of gradients g = [[1, 1], [1, 0.5]]:
    Taylor (w g)^2 = [[1, 4], [9, 4]], mean 4.5 -> [[2/9, 8/9], [2, 8/9]]
    Magnitude |w| = [[1, 2], [3, 4]], mean 2.5 -> [[0.4, 0.8], [1.2, 1.6]]
    0.7 Taylor + 0.3 Magnitude = [[0.7*2/9 + 0.12, 0.7*8/9 + 0.24], [1.4 + 0.36, 0.7*8/9 + 0.48]]
                               = [[0.2756, 0.8622], [1.76, 1.1022]]
"""

import pytest
import torch
from torch import nn

from prunq.prune import masks as M
from prunq.prune.granularity import Granularity
from prunq.prune.importance import Blend, Magnitude, Random, Taylor, get_criterion
from prunq.prune.pruner import PruneConfig, Pruner

W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
G = torch.tensor([[1.0, 1.0], [1.0, 0.5]])
ELEMENT = Granularity.parse("element")
EXPECTED = torch.tensor([[0.7 * 2 / 9 + 0.12, 0.7 * 8 / 9 + 0.24], [1.4 + 0.36, 0.7 * 8 / 9 + 0.48]])


def test_blend_scores_by_hand():
    b = Blend({Taylor(): 0.7, Magnitude(): 0.3})
    assert b.needs_grad
    b.accumulate("fc", W, G, ELEMENT)
    assert torch.allclose(b.scores("fc", W, ELEMENT), EXPECTED)


def test_the_config_builds_a_blend_and_the_pruner_uses_it():
    cfg = PruneConfig(criterion={"taylor": 0.7, "magnitude": 0.3}, mode="hard", min_density=0, min_per_channel=0)
    net = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(W)
    p = Pruner(net, cfg)
    assert isinstance(p.criterion, Blend)
    assert {type(c).__name__: w for c, w in p.criterion.criteria.items()} == {"Taylor": 0.7, "Magnitude": 0.3}
    M.original(net[0]).grad = G.clone()
    p.accumulate()
    assert torch.allclose(p.scores()["0"], EXPECTED)
    p.prune(0.5)  # blended ranking 1.76, 1.1022 | 0.8622, 0.2756 (Taylor alone would keep 9 and the first 4)
    assert M.get_mask(net[0]).mask.tolist() == [[0, 0], [1, 1]]


def test_accumulate_forwards_only_to_gradient_members_and_reset_resets_all():
    t, m = Taylor(), Magnitude()
    b = Blend({t: 1.0, m: 1.0})
    b.accumulate("fc", W, G, ELEMENT)
    assert t.batches_seen("fc") == 1 and m.batches_seen("fc") == 0
    assert b.batches_seen("fc") == 1
    state = b.state_dict()
    b.reset()
    assert t.batches_seen("fc") == 0
    b.load_state_dict(state)
    assert t.batches_seen("fc") == 1
    assert torch.allclose(t.scores("fc", W, ELEMENT), (W * G) ** 2)


def test_a_blend_without_gradient_members_needs_no_gradients():
    b = get_criterion({"magnitude": 0.5, "random": 0.5}, seed=3)
    assert isinstance(b, Blend) and not b.needs_grad
    s = b.scores("fc", W, ELEMENT)
    assert s.shape == W.shape and torch.isclose(s.mean(), torch.tensor(1.0))  # each member has mean 1 x 0.5


def test_zero_weights_drop_out_and_an_all_zero_member_contributes_nothing():
    b = Blend({Taylor(): 0.0, Magnitude(): 1.0})
    assert not b.needs_grad and len(b.criteria) == 1
    zero = torch.zeros(2, 2)
    assert torch.equal(Blend({Magnitude(): 1.0, Random(): 0.0}).scores("fc", zero, ELEMENT), zero)
    with pytest.raises(ValueError, match="at least one of them > 0"):
        Blend({Magnitude(): 0.0})


def test_ema_is_shared_by_the_members():
    b = get_criterion({"taylor": 1.0, "fisher": 1.0}, ema=0.5)
    assert b.ema == 0.5
    assert get_criterion({"taylor": 1.0, "magnitude": 1.0}).ema is None
