"""Random scores (prunq.prune.importance.random): uniform, from a generator seeded by the seed and the tensor's
name, fixed per tensor (so masks are nested as the sparsity grows) and independent of the weights."""

from __future__ import annotations

import zlib

import torch

from prunq.prune.granularity import Channel, Element, Kernel
from prunq.prune.importance import Random, get_criterion


def _expected(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.rand(shape, generator=g)


def test_scores_come_from_the_seed_and_the_name():
    w = torch.randn(4, 3)
    s = Random(seed=2).scores("features.conv1", w, Element())
    assert torch.equal(s, _expected(2, "features.conv1", (4, 3)))
    assert ((0 <= s) & (s < 1)).all()
    assert torch.equal(Random(seed=2).scores("features.conv1", torch.zeros(4, 3), Element()), s)  # weights unused
    assert not torch.equal(Random(seed=3).scores("features.conv1", w, Element()), s)
    assert not torch.equal(Random(seed=2).scores("features.conv2", w, Element()), s)


def test_scores_are_fixed_per_tensor_and_follow_the_group_shape():
    r = Random(seed=0)
    w = torch.randn(4, 3)
    first = r.scores("fc", w, Element())
    assert r.scores("fc", w * 10, Element()) is first  # the same scores at every cut
    assert torch.equal(r.scores("fc", w, Channel()), _expected(0, "fc", (4,)))  # another group shape: new draw
    assert r.scores("c", torch.randn(2, 3, 3, 3), Kernel()).shape == (2, 3)
    assert not r.needs_grad and type(get_criterion("random", seed=5)) is Random
    assert get_criterion("random", seed=5).seed == 5

