"""Allocation: a pure function from group scores to group keep-masks.

No model, no state: the pruner calls it once per cut, and a search (blend weights, per-layer budgets)
can call it hundreds of times on the same scores without touching a model.

* ``global`` -- one ranking across every tensor; ``layer`` -- the same sparsity in each tensor.
* A per-tensor floor so that no layer collapses: the best ``min_per_channel`` groups of every output
  channel (the best whole channel for channel granularity), then the best groups until ``min_density``
  of the tensor's weights is kept.
* ``pins``: tensors whose sparsity is fixed (recipe ``overrides``); under ``global`` allocation their
  kept weights come out of the shared budget.
* A score of ``-inf`` means "may not be kept unless the floor forces it" (a hard-pruned group, or a
  pruned group over the soft-mode regrow cap).

>>> import torch
>>> keep = allocate({"a": torch.tensor([[3.0, 1.0], [2.0, 4.0]])}, {"a": torch.ones(2, 2, dtype=torch.int64)},
...                 0.5, min_density=0, min_per_channel=0)
>>> keep["a"].int().tolist()
[[1, 0], [0, 1]]
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Literal, get_args

import torch

from prunq.core.errors import PrunqError

#: How a target sparsity is shared between tensors (the names of :data:`ALLOCATORS`, for config schemas).
Allocation = Literal["global", "layer"]
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)

#: Frames a warning skips to reach the user's call: prunq/prune/ itself and torch's no_grad wrapper.
_INTERNAL = (os.path.dirname(__file__) + os.sep, os.path.join("torch", "utils", "_contextlib.py"))


def allocate(
    scores: dict[str, torch.Tensor],
    sizes: dict[str, torch.Tensor],
    sparsity: float,
    *,
    allocation: str = "global",
    min_density: float = 0.002,
    min_per_channel: int = 1,
    pins: dict[str, float] | None = None,
    channel_granularity: bool = False,
) -> dict[str, torch.Tensor]:
    """Boolean group keep-masks (each of its scores' shape) for ``sparsity`` over all tensors.

    ``scores[name]`` are group scores with the output channel first (higher = kept first);
    ``sizes[name]`` the number of weights in each group (same shape, int). Deterministic: ties go to
    the lower flat index, tensors in dict order. The inputs are not modified. When the floor (and the
    pinned tensors) keep more than the target allows, the result is less sparse and a warning says so.
    """
    allocator = ALLOCATORS.get(allocation)
    if allocator is None:
        raise PrunqError(f"prune.allocation: unknown allocation {allocation!r} (choose from {', '.join(ALLOCATORS)})")
    return allocator(scores, sizes, sparsity, min_density, min_per_channel, pins or {}, channel_granularity)


def floor(
    scores: torch.Tensor, sizes: torch.Tensor, *, min_density: float, min_per_channel: int, channel_granularity: bool
) -> torch.Tensor:
    """Groups one tensor must keep: the best ``min_per_channel`` per output channel (the best channel
    for channel granularity), then the best groups until ``ceil(min_density * weights)`` are kept."""
    forced = torch.zeros(scores.shape, dtype=torch.bool)
    if scores.numel() == 0:
        return forced
    if channel_granularity:
        if min_per_channel > 0:
            forced.view(-1)[_order(scores.reshape(-1))[0]] = True
    else:
        rows = scores.reshape(scores.shape[0], -1)
        k = min(min_per_channel, rows.shape[1])
        if k > 0:
            idx = torch.argsort(rows, dim=1, descending=True, stable=True)[:, :k]
            forced.view(rows.shape).scatter_(1, idx, True)
    need = math.ceil(min_density * int(sizes.sum()))
    have = int(sizes[forced].sum())
    if have < need:
        flat = forced.view(-1)
        order = _order(scores.reshape(-1).masked_fill(flat, float("-inf")))
        order = order[~flat[order]]
        csum = sizes.reshape(-1)[order].cumsum(0)
        n_more = int(torch.searchsorted(csum, torch.tensor(need - have)).item()) + 1
        flat[order[:n_more]] = True
    return forced


def _order(flat: torch.Tensor) -> torch.Tensor:
    """Indices by descending score, ties to the lower index."""
    return torch.argsort(flat, descending=True, stable=True)


def _take_best(scores: torch.Tensor, sizes: torch.Tensor, budget: int) -> torch.Tensor:
    """Greedy by score: keep finite-score groups while their cumulative size fits ``budget`` weights."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    if budget <= 0 or scores.numel() == 0:
        return keep
    flat = scores.reshape(-1)
    order = _order(flat)
    order = order[torch.isfinite(flat[order])]  # -inf never competes (and NaN is never kept)
    csum = sizes.reshape(-1)[order].cumsum(0)
    keep[order[csum <= budget]] = True
    return keep


def _one(
    s: torch.Tensor, sizes: torch.Tensor, sparsity: float, min_density: float, min_per_channel: int, channel: bool
) -> torch.Tensor:
    forced = floor(s, sizes, min_density=min_density, min_per_channel=min_per_channel, channel_granularity=channel)
    budget = round((1.0 - sparsity) * int(sizes.sum())) - int(sizes[forced].sum())
    if budget < 0:
        _warn_floor(sparsity)
    return _take_best(s.masked_fill(forced, float("-inf")), sizes, budget).reshape(s.shape) | forced


def _layer(
    scores: dict[str, torch.Tensor],
    sizes: dict[str, torch.Tensor],
    sparsity: float,
    min_density: float,
    min_per_channel: int,
    pins: dict[str, float],
    channel: bool,
) -> dict[str, torch.Tensor]:
    return {
        name: _one(s, sizes[name], pins.get(name, sparsity), min_density, min_per_channel, channel)
        for name, s in scores.items()
    }


def _global(
    scores: dict[str, torch.Tensor],
    sizes: dict[str, torch.Tensor],
    sparsity: float,
    min_density: float,
    min_per_channel: int,
    pins: dict[str, float],
    channel: bool,
) -> dict[str, torch.Tensor]:
    total = sum(int(z.sum()) for z in sizes.values())
    budget = round((1.0 - sparsity) * total)
    out: dict[str, torch.Tensor] = {}
    pool: list[tuple[str, torch.Tensor]] = []
    for name, s in scores.items():
        z = sizes[name]
        if name in pins:
            out[name] = _one(s, z, pins[name], min_density, min_per_channel, channel)
        else:
            out[name] = floor(
                s, z, min_density=min_density, min_per_channel=min_per_channel, channel_granularity=channel
            )
            pool.append((name, s.masked_fill(out[name], float("-inf")).reshape(-1)))
        budget -= int(z[out[name]].sum())
    if budget < 0:
        _warn_floor(sparsity)
    if pool:
        keep = _take_best(torch.cat([s for _, s in pool]), torch.cat([sizes[n].reshape(-1) for n, _ in pool]), budget)
        offset = 0
        for name, s in pool:
            out[name] = out[name] | keep[offset : offset + s.numel()].reshape(out[name].shape)
            offset += s.numel()
    return {name: out[name] for name in scores}


#: Every allocation, by name: ``(scores, sizes, sparsity, min_density, min_per_channel, pins, channel) -> masks``.
ALLOCATORS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"global": _global, "layer": _layer}


def _internal(filename: str) -> bool:
    return filename.startswith(_INTERNAL[0]) or filename.endswith(_INTERNAL[1])


def _warn_floor(sparsity: float) -> None:
    # Point at the first frame outside prunq/prune/: the code that called Pruner.prune/step or allocate.
    frame, level = sys._getframe(1), 2
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(
        f"prune: the per-tensor floor and pinned layers keep more than the budget; sparsity will be "
        f"below {sparsity:.4f}",
        stacklevel=level,
    )


__all__ = ["ALLOCATIONS", "ALLOCATORS", "Allocation", "allocate", "floor"]
