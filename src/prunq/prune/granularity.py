"""How weights are grouped for pruning: element, kernel, channel, N:M — one small class each.

Every granularity is registered by name in :data:`GRANULARITIES`; :meth:`Granularity.parse` asks each
class whether it reads a recipe's text (``"kernel"``, ``"2:4"``), so a new granularity is one class and
one decorator, and nothing in the pruner branches on a name.

All methods take tensors in the *canonical* layout ``(out, in_per_group, *kernel)`` (see
:mod:`prunq.core.layers`). A group tensor always has the output channel as its first dimension, so the
per-output-channel floor is one rule for every granularity.

>>> Granularity.parse("2:4"), Granularity.parse("kernel").group_shape((8, 4, 3, 3))
(NM(n=2, m=4), (8, 4))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from prunq.core.errors import PrunqError
from prunq.prune.allocate import allocate

#: Every granularity, by registered name (``"n:m"`` stands for all ``"N:M"`` texts).
GRANULARITIES: dict[str, type[Granularity]] = {}

_G = TypeVar("_G", bound="type[Granularity]")


def register_granularity(cls: _G) -> _G:
    """Class decorator: make ``cls`` parseable by :meth:`Granularity.parse` under ``cls.name``."""
    GRANULARITIES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Granularity:
    """A pruning granularity: the groups a mask keeps or removes whole.

    ``group_dims`` leading canonical dimensions index a group (``None``: every dimension, one weight
    per group); the remaining dimensions are reduced over. Subclasses only set the name and this.
    """

    name: ClassVar[str] = ""
    group_dims: ClassVar[int | None] = None
    #: True when a group is a whole output channel (the floor then keeps whole channels).
    whole_channel: ClassVar[bool] = False

    @classmethod
    def from_text(cls, text: str) -> Granularity | None:
        """An instance when ``text`` names this granularity, else ``None``."""
        return cls() if text == cls.name else None

    @staticmethod
    def parse(text: str | Granularity) -> Granularity:
        """``"element" | "kernel" | "channel" | "N:M"`` (e.g. ``"2:4"``), through the registry."""
        if isinstance(text, Granularity):
            return text
        t = str(text).strip()
        for cls in GRANULARITIES.values():
            g = cls.from_text(t)
            if g is not None:
                return g
        names = ", ".join(n for n in GRANULARITIES if n != "n:m")
        raise PrunqError(f"prune.granularity: unknown granularity {text!r} (choose from {names}, N:M)")

    def __str__(self) -> str:
        return self.name

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity this granularity always reaches, or ``None`` when the allocation decides."""
        return None

    # -- group geometry -------------------------------------------------------------------------
    def group_shape(self, canon: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the group tensor for a canonical weight shape."""
        return tuple(canon if self.group_dims is None else canon[: self.group_dims])

    def reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a canonical tensor over each group."""
        d = self.group_dims
        if d is None or d >= x.dim():
            return x
        return x.reshape(*x.shape[:d], -1).sum(-1)

    def reduce_norm(self, x: torch.Tensor) -> torch.Tensor:
        """L2 norm of a canonical tensor over each group (``|x|`` for single weights)."""
        if self.group_dims is None:
            return x.abs()
        return self.reduce_sum(x * x).sqrt()

    def group_sizes(self, canon: tuple[int, ...]) -> torch.Tensor:
        """Number of weights in each group (group-tensor shape, int64)."""
        gshape = self.group_shape(canon)
        n = 1
        for d in canon[len(gshape) :]:
            n *= d
        return torch.full(gshape, n, dtype=torch.int64)

    def expand(self, group_mask: torch.Tensor, canon: tuple[int, ...]) -> torch.Tensor:
        """Element mask (canonical shape) from a group mask."""
        g = group_mask.reshape(*group_mask.shape, *([1] * (len(canon) - group_mask.dim())))
        return g.expand(canon).contiguous()

    def group_mask(self, element_mask: torch.Tensor) -> torch.Tensor:
        """Which groups a canonical element mask keeps (any weight kept = the group is kept)."""
        return self.reduce_sum((element_mask != 0).float()) > 0

    # -- selection ------------------------------------------------------------------------------
    def select(
        self, scores: dict[str, torch.Tensor], sizes: dict[str, torch.Tensor], sparsity: float, **policy
    ) -> dict[str, torch.Tensor]:
        """Group keep-masks for every tensor: :func:`~prunq.prune.allocate.allocate` with ``policy``
        (``allocation``, ``min_density``, ``min_per_channel``, ``pins``)."""
        return allocate(scores, sizes, sparsity, channel_granularity=self.whole_channel, **policy)


@register_granularity
@dataclass(frozen=True)
class Element(Granularity):
    """One weight per group (unstructured)."""

    name: ClassVar[str] = "element"


@register_granularity
@dataclass(frozen=True)
class Kernel(Granularity):
    """The k×k… kernel of one (in, out) pair."""

    name: ClassVar[str] = "kernel"
    group_dims: ClassVar[int | None] = 2


@register_granularity
@dataclass(frozen=True)
class Channel(Granularity):
    """A whole output filter."""

    name: ClassVar[str] = "channel"
    group_dims: ClassVar[int | None] = 1
    whole_channel: ClassVar[bool] = True


@register_granularity
@dataclass(frozen=True)
class NM(Granularity):
    """At most ``n`` non-zeros in every ``m`` consecutive weights along the input dimension.

    Groups are single weights; what is special is the selection: every cut keeps the ``n`` best of each
    block, so the sparsity is fixed at ``1 - n/m`` and the per-tensor floor is implied (``n`` per block).
    The allocation, the floor and pins do not apply (a config refuses ``overrides`` with N:M); the
    schedule only decides *when* blocks are re-selected (soft mode can swap weights within a block).
    An input dimension not divisible by ``m`` ends in a short block, which keeps at most ``n`` of its
    weights; a depthwise layer (one input per group) has one weight per block and keeps it, so the
    sparsity reached is below ``1 - n/m`` for such layers.

    >>> NM(2, 4).block_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0, 5.0]])).int().tolist()
    [[1, 0, 1, 0, 1]]
    """

    name: ClassVar[str] = "n:m"
    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise PrunqError(f"prune.granularity: N:M needs 0 < N < M, got {self.n}:{self.m}")

    @classmethod
    def from_text(cls, text: str) -> Granularity | None:  # noqa: D102
        found = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
        return cls(int(found.group(1)), int(found.group(2))) if found else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def fixed_sparsity(self) -> float:  # noqa: D102
        return 1.0 - self.n / self.m

    def block_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep the ``n`` highest scores in each block of ``m`` along the input dimension.

        Blocks run over input channels at a fixed output channel and kernel position (the layout
        sparse tensor cores use). The short last block is padded with ``-inf``; a ``-inf`` score (a
        hard-pruned weight, or one over the regrow cap) is never kept.
        """
        out, cin, *k = scores.shape
        s = scores.reshape(out, cin, -1).transpose(1, 2)  # (out, K, cin)
        pad = (-cin) % self.m
        if pad:
            s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
        blocks = s.reshape(out, s.shape[1], -1, self.m)
        idx = blocks.topk(self.n, dim=-1).indices
        keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, idx, True)
        keep = keep & torch.isfinite(blocks)
        keep = keep.reshape(out, s.shape[1], -1)[..., :cin]
        return keep.transpose(1, 2).reshape(scores.shape)

    def select(  # noqa: D102
        self, scores: dict[str, torch.Tensor], sizes: dict[str, torch.Tensor], sparsity: float, **policy
    ) -> dict[str, torch.Tensor]:
        return {name: self.block_mask(s) for name, s in scores.items()}


__all__ = ["Channel", "Element", "GRANULARITIES", "Granularity", "Kernel", "NM", "register_granularity"]
