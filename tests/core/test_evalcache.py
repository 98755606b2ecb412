"""The eval cache is exact: any in-place change of an input (or of the output) recomputes; never with grad."""

from __future__ import annotations

import copy

import torch
from torch import nn

import prunq
from prunq.core.evalcache import EvalCache
from prunq.prune.masks import attach_mask, set_mask, zero_pruned_


def test_cache_hits_and_invalidates():
    c, calls = EvalCache(), []
    w, s = torch.ones(3), torch.tensor(2.0)

    def f():
        calls.append(1)
        return w * s

    with torch.no_grad():
        a = c(f, w, s)
        assert c(f, w, s) is a and len(calls) == 1
        s.fill_(3.0)  # an input changed in place
        assert c(f, w, s).tolist() == [3.0] * 3 and len(calls) == 2
        out = c(f, w, s)
        out.add_(1)  # the output was changed in place: never handed out again
        assert c(f, w, s).tolist() == [3.0] * 3 and len(calls) == 3
        assert c(f, torch.ones(3), s) is not None and len(calls) == 4  # another tensor object
    c(f, w, s)  # with grad enabled: no cache
    c(f, w, s)
    assert len(calls) == 6 and c._out is None
    with torch.inference_mode():
        x = torch.ones(2)
        c(lambda: x * 2, x)
        c(lambda: x * 2, x)  # inference tensors have no version counter: never cached
    assert copy.deepcopy(c)._out is None


def test_a_prepared_model_in_eval_is_exact_and_follows_every_change():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    attach_mask(m[0])
    set_mask(m[0], torch.rand(5, 6) > 0.5)
    prunq.prepare(m, prunq.QuantConfig(weight_bits=3, act_bits=8))
    x = torch.rand(4, 6)
    prunq.calibrate(m, [x])
    m.eval()

    def fresh():
        ref = copy.deepcopy(m)  # a copy starts with empty caches
        with torch.no_grad():
            return ref(x)

    with torch.no_grad():
        y = m(x)
        assert torch.equal(m(x), y) and torch.equal(y, fresh())
        m[0].parametrizations.weight.original.mul_(0.5)  # weights changed in place
        assert torch.equal(m(x), fresh()) and not torch.equal(m(x), y)
        set_mask(m[0], torch.ones(5, 6))  # mask changed
        assert torch.equal(m(x), fresh())
        m[2].parametrizations.weight[0].step.mul_(2)  # a weight step changed
        assert torch.equal(m(x), fresh())
        m.load_state_dict(copy.deepcopy(m).state_dict())
        assert torch.equal(m(x), fresh())
    zero_pruned_(m[0])
    m.train()
    loss = m(x).sum()
    loss.backward()  # training: gradients flow, nothing cached
    assert m[0].parametrizations.weight.original.grad is not None
