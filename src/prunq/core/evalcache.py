"""A one-entry cache for a weight parametrization's output when no gradient is recorded.

Why: a parametrized weight (``mask * W``, then ``Q(mask * W)``) is recomputed at every forward. In
inference that is pure overhead — at batch 1 a small CNN spent more time re-quantizing its weights than
convolving (2.3x the dense latency, ``bench/quant_speed.py``). ``parametrize.cached()`` fixes it but must be
entered by the caller; this cache makes an eval-mode forward fast by itself.

It is exact: an entry is used only while every input tensor is the same object at the same version (an
in-place change — a fold, zeroing pruned shadows, loading a state dict, an optimizer step — bumps the
version) and the cached output itself was not changed in place. It is never used while autograd records
(training, or any forward that needs gradients), under tracing or compilation, or on inference tensors
(which carry no version counter).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _usable(tensors: tuple[torch.Tensor, ...]) -> bool:
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return all(isinstance(t, torch.Tensor) and not t.is_inference() for t in tensors)


class EvalCache:
    """``cache(fn, *inputs)``: ``fn()`` computed once per (inputs, versions) while no gradient is recorded.

    >>> c, calls = EvalCache(), []
    >>> w = torch.ones(2)
    >>> with torch.no_grad():
    ...     a = c(lambda: calls.append(1) or w * 2, w); b = c(lambda: calls.append(1) or w * 2, w)
    ...     _ = w.add_(1); d = c(lambda: calls.append(1) or w * 2, w)
    >>> a is b, len(calls), d.tolist()
    (True, 2, [4.0, 4.0])
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget the entry."""
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._versions: tuple[int, ...] = ()
        self._out: torch.Tensor | None = None
        self._out_version = -1

    def __call__(self, fn: Callable[[], torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not _usable(inputs):
            self.clear()  # hold no tensor (or graph) while training
            return fn()
        versions = tuple(t._version for t in inputs)
        out = self._out
        if (
            out is not None
            and len(inputs) == len(self._inputs)
            and all(a is b for a, b in zip(inputs, self._inputs))
            and versions == self._versions
            and out._version == self._out_version
        ):
            return out
        out = fn()
        self._inputs, self._versions, self._out, self._out_version = inputs, versions, out, out._version
        return out

    def __deepcopy__(self, memo: dict) -> EvalCache:
        return EvalCache()  # a copy starts empty (its tensors are new objects anyway)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()
