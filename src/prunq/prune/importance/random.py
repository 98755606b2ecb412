"""Random scores, seeded and fixed per tensor so that masks are nested as sparsity grows."""

from __future__ import annotations

import zlib

import torch

from prunq.prune.granularity import Granularity
from prunq.prune.importance.base import Criterion, register_criterion


@register_criterion
class Random(Criterion):
    """Uniform random group scores from a generator seeded by ``seed`` and the tensor name."""

    name = "random"

    def __init__(self, ema: float | None = None, seed: int = 0) -> None:
        super().__init__(ema, seed)
        self._cache: dict[str, torch.Tensor] = {}

    def scores(self, name: str, weight: torch.Tensor, gran: Granularity) -> torch.Tensor:  # noqa: D102
        shape = gran.group_shape(tuple(weight.shape))
        cached = self._cache.get(name)
        if cached is None or tuple(cached.shape) != shape:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            cached = torch.rand(shape, generator=g)
            self._cache[name] = cached
        return cached.to(weight.device)
