"""Magnitude scores (prunq.prune.importance.magnitude): |w| per element, the L2 norm of a group, by hand."""

from __future__ import annotations

import torch

from prunq.prune.granularity import NM, Channel, Element, Kernel
from prunq.prune.importance import CRITERIA, Magnitude, get_criterion

W = torch.tensor([[3.0, -4.0], [0.0, 1.0]])  # canonical (out 2, in 2)


def test_element_scores_are_absolute_values():
    assert Magnitude().scores("fc", W, Element()).tolist() == [[3.0, 4.0], [0.0, 1.0]]
    assert Magnitude().scores("fc", W, NM(1, 2)).tolist() == [[3.0, 4.0], [0.0, 1.0]]  # N:M groups are single weights


def test_group_scores_are_l2_norms():
    assert Magnitude().scores("fc", W, Channel()).tolist() == [5.0, 1.0]  # sqrt(9 + 16), sqrt(0 + 1)
    conv = torch.zeros(2, 2, 2, 2)  # (out, in, kh, kw)
    conv[0, 0] = torch.tensor([[1.0, -1.0], [1.0, 1.0]])  # sqrt(4) = 2
    conv[0, 1] = torch.tensor([[0.0, 0.0], [-3.0, 4.0]])  # 5
    conv[1, 1, 0, 0] = -7.0  # 7; kernel (1, 0) is all zeros
    assert Magnitude().scores("c", conv, Kernel()).tolist() == [[2.0, 5.0], [0.0, 7.0]]
    assert torch.allclose(Magnitude().scores("c", conv, Channel()), torch.tensor([29.0, 49.0]).sqrt())


def test_scores_need_no_gradients_and_ignore_statistics():
    m = Magnitude()
    assert not m.needs_grad and CRITERIA["magnitude"] is Magnitude and type(get_criterion("magnitude")) is Magnitude
    w = W.clone().to(torch.float16).requires_grad_()
    s = m.scores("fc", w, Element())
    assert s.dtype == torch.float32 and s.grad_fn is None  # detached, in float
    m.accumulate("fc", w, torch.ones(2, 2), Element())  # nothing to accumulate
    assert m.batches_seen("fc") == 0
    assert m.scores("other-name", W, Element()).tolist() == s.tolist()  # the name plays no part
