"""How weights are grouped for pruning: element, kernel, channel, N:M.

All functions take tensors in the *canonical* layout ``(out, in_per_group, *kernel)`` (see
:mod:`prunq.core.layers`). A group tensor always has the output channel as its first dimension, so the
per-output-channel floor is one rule for every granularity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from prunq.core.errors import PrunqError

KINDS = ("element", "kernel", "channel", "n:m")


@dataclass(frozen=True)
class Granularity:
    """A pruning granularity.

    ``element`` — one weight; ``kernel`` — the k×k… kernel of one (in, out) pair; ``channel`` — a
    whole output filter; ``n:m`` — at most ``n`` non-zeros in every ``m`` consecutive weights along the
    input dimension (fixed sparsity ``1 - n/m``).

    >>> Granularity.parse("2:4")
    Granularity(kind='n:m', n=2, m=4)
    """

    kind: str = "element"
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PrunqError(
                f"prune.granularity: unknown granularity {self.kind!r} (choose from element, kernel, channel, N:M)"
            )
        if self.kind == "n:m" and not (0 < self.n < self.m):
            raise PrunqError(f"prune.granularity: N:M needs 0 < N < M, got {self.n}:{self.m}")

    @staticmethod
    def parse(text: str) -> Granularity:
        """``"element" | "kernel" | "channel" | "N:M"`` (e.g. ``"2:4"``)."""
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if m:
            return Granularity("n:m", int(m.group(1)), int(m.group(2)))
        return Granularity(str(text))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "n:m" else self.kind

    # -- group geometry -------------------------------------------------------------------------
    def group_shape(self, canon: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the group tensor for a canonical weight shape."""
        if self.kind == "kernel":
            return tuple(canon[:2])
        if self.kind == "channel":
            return (canon[0],)
        return tuple(canon)

    def reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a canonical tensor over each group."""
        if self.kind == "kernel":
            return x.reshape(*x.shape[:2], -1).sum(-1)
        if self.kind == "channel":
            return x.reshape(x.shape[0], -1).sum(-1)
        return x

    def reduce_norm(self, x: torch.Tensor) -> torch.Tensor:
        """L2 norm of a canonical tensor over each group (|x| for single elements)."""
        if self.kind in ("kernel", "channel"):
            return self.reduce_sum(x * x).sqrt()
        return x.abs()

    def group_sizes(self, canon: tuple[int, ...]) -> torch.Tensor:
        """Number of weights in each group (group-tensor shape, int64)."""
        n = 1
        gshape = self.group_shape(canon)
        for d in canon[len(gshape) :]:
            n *= d
        return torch.full(gshape, n, dtype=torch.int64)

    def expand(self, group_mask: torch.Tensor, canon: tuple[int, ...]) -> torch.Tensor:
        """Element mask (canonical shape) from a group mask."""
        g = group_mask.reshape(*group_mask.shape, *([1] * (len(canon) - group_mask.dim())))
        return g.expand(canon).contiguous()

    # -- N:M ------------------------------------------------------------------------------------
    def nm_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep the ``n`` highest scores in each block of ``m`` along the input dimension.

        Blocks run over input channels at a fixed output channel and kernel position (the layout
        sparse tensor cores use). An input dimension not divisible by ``m`` is padded: the last,
        short block keeps at most ``n`` of its weights.
        """
        if self.kind != "n:m":
            raise ValueError("nm_mask needs an n:m granularity")
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
