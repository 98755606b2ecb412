"""The Taylor score against a hand computation on a tiny two-layer linear model.

W1 = [[1, 2], [3, 4]], W2 = [[1, -1]], loss = W2 W1 x (no bias).
batch 1, x = (1, 1): h = (3, 7), dL/dW2 = (3, 7), dL/dW1 = [[1, 1], [-1, -1]]
    (w g)^2: W1 [[1, 4], [9, 16]], W2 [[9, 49]]; row sums of w g: W1 (3, -7), W2 (-4)
batch 2, x = (2, 0): h = (2, 6), dL/dW2 = (2, 6), dL/dW1 = [[2, 0], [-2, 0]]
    (w g)^2: W1 [[4, 0], [36, 0]], W2 [[4, 36]]; row sums of w g: W1 (2, -6), W2 (-4)
mean element scores: W1 [[2.5, 2], [22.5, 8]], W2 [[6.5, 42.5]]
mean channel scores: W1 ((9+4)/2, (49+36)/2) = (6.5, 42.5), W2 (16)
"""

import pytest
import torch
from torch import nn

from prunq.prune.pruner import PruneConfig, Pruner


def _model():
    m = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        m[1].weight.copy_(torch.tensor([[1.0, -1.0]]))
    return m


def _accumulate(pruner, model):
    for x in (torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])):
        model.zero_grad()
        model(x).sum().backward()
        pruner.accumulate()


def _cfg(**kw):
    base = dict(criterion="taylor", mode="hard", schedule="one_shot", min_density=0.0, min_per_channel=0)
    base.update(kw)
    return PruneConfig(**base)


def test_element_scores_match_hand_computation():
    m = _model()
    p = Pruner(m, _cfg())
    _accumulate(p, m)
    w1 = p.criterion.scores("0", m[0].parametrizations.weight.original, p.gran)
    w2 = p.criterion.scores("1", m[1].parametrizations.weight.original, p.gran)
    assert torch.allclose(w1, torch.tensor([[2.5, 2.0], [22.5, 8.0]]))
    assert torch.allclose(w2, torch.tensor([[6.5, 42.5]]))


def test_channel_scores_square_the_group_sum():
    m = _model()
    p = Pruner(m, _cfg(granularity="channel"))
    _accumulate(p, m)
    assert torch.allclose(p.criterion.scores("0", None, p.gran), torch.tensor([6.5, 42.5]))
    assert torch.allclose(p.criterion.scores("1", None, p.gran), torch.tensor([16.0]))


def test_global_and_layer_allocation_cut_exact_masks():
    # keep round(2/3 * 6) = 4 weights
    m = _model()
    p = Pruner(m, _cfg(allocation="global"))
    _accumulate(p, m)
    assert p.prune(1 / 3) == pytest.approx(1 / 3)
    # global ranking 42.5, 22.5, 8, 6.5 | 2.5, 2
    assert m[0].parametrizations.weight[0].mask.tolist() == [[0, 0], [1, 1]]
    assert m[1].parametrizations.weight[0].mask.tolist() == [[1, 1]]

    m = _model()
    p = Pruner(m, _cfg(allocation="layer"))
    _accumulate(p, m)
    p.prune(1 / 3)
    # W1 keeps round(4 * 2/3) = 3: 22.5, 8, 2.5; W2 keeps round(2 * 2/3) = 1: 42.5
    assert m[0].parametrizations.weight[0].mask.tolist() == [[1, 0], [1, 1]]
    assert m[1].parametrizations.weight[0].mask.tolist() == [[0, 1]]


def test_scores_need_gradients():
    m = _model()
    p = Pruner(m, _cfg())
    with pytest.raises(RuntimeError, match="accumulate"):
        p.prune(0.5)
