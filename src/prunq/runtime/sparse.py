"""A sparse CPU runtime: layers whose measured sparse time beats their dense time run as CSR matmuls.

:func:`sparsify` takes a *converted* model (:func:`prunq.convert`: masks and weight grids baked into plain
weights) and the inputs it will see, times every Linear and Conv2d on its real input — the dense kernel
against a CSR formulation — and swaps in the sparse one only where it is faster (by ``min_speedup``):

* **Linear**: ``y = W_csr @ xᵀ`` (``torch.sparse`` CSR × dense, MKL on x86);
* **Conv2d 1×1**, stride 1, no padding: the same on the ``(C, B·H·W)`` view of the input;
* **Conv2d k×k**: ``unfold`` (im2col) into ``(C·k·k, B·L)`` then the CSR matmul. im2col costs memory
  traffic the dense kernel avoids, so this wins only at high sparsity — the timing decides.

Grouped convolutions, ConvTranspose and non-zero padding modes stay dense. The swap changes the module's
class to a subclass (``SparseLinear``/``SparseConv2d``) whose ``forward`` uses a CSR copy of the weight;
the dense weight stays the parameter (state dicts, exports and the cost model see the same model), so
outputs equal the dense converted model's up to float summation order. Quantized weights run as their
float values (``k · step``); an integer path (int8 CSR values and a per-channel rescale) would cut the
weight bytes read per multiply by 4 but needs kernels torch does not have for sparse tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from prunq.core.errors import PrunqError

__all__ = ["sparsify", "SparseLinear", "SparseConv2d", "desparsify"]


def _csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The CSR parts of the weight's ``(out, rest)`` view: plain tensors, so the module deep-copies
    (a sparse CSR tensor has no storage to copy); :func:`_as_csr` assembles them without a copy."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        m = weight.detach().reshape(weight.shape[0], -1).to_sparse_csr()
    return m.crow_indices(), m.col_indices(), m.values(), tuple(m.shape)  # type: ignore[return-value]


def _as_csr(parts: tuple) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(*parts[:3], size=parts[3])


class SparseLinear(nn.Linear):
    """A Linear computing ``x @ Wᵀ`` as ``(W_csr @ xᵀ)ᵀ``; the dense weight stays its parameter."""

    _prunq_csr: tuple

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        lead = x.shape[:-1]
        y = (_as_csr(self._prunq_csr) @ x.reshape(-1, x.shape[-1]).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class SparseConv2d(nn.Conv2d):
    """A Conv2d (groups 1, zero padding) computed as a CSR matmul on the im2col view of its input."""

    _prunq_csr: tuple

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        unbatched = x.dim() == 3
        if unbatched:
            x = x[None]
        b, c, h, w = x.shape
        o = self.out_channels
        k = self.kernel_size
        if k == (1, 1) and self.stride == (1, 1) and self.padding in ((0, 0), "valid") and self.dilation == (1, 1):
            cols = x.permute(1, 0, 2, 3).reshape(c, b * h * w)
            ho, wo = h, w
        else:
            pad = self.padding if isinstance(self.padding, tuple) else _same_padding(self)
            u = F.unfold(x, k, dilation=self.dilation, padding=pad, stride=self.stride)  # (B, C*k*k, L)
            ho = (h + 2 * pad[0] - self.dilation[0] * (k[0] - 1) - 1) // self.stride[0] + 1
            wo = (w + 2 * pad[1] - self.dilation[1] * (k[1] - 1) - 1) // self.stride[1] + 1
            cols = u.permute(1, 0, 2).reshape(u.shape[1], b * ho * wo)
        y = (_as_csr(self._prunq_csr) @ cols).reshape(o, b, ho, wo).permute(1, 0, 2, 3)
        if self.bias is not None:
            y = y + self.bias.reshape(1, o, 1, 1)
        y = y.contiguous()
        return y[0] if unbatched else y


def _same_padding(conv: nn.Conv2d) -> tuple[int, int]:
    return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))  # type: ignore[return-value]


def _candidate(module: nn.Module) -> type | None:
    if parametrize.is_parametrized(module):
        return None
    if type(module) is nn.Linear:
        return SparseLinear
    if type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros":
        return SparseConv2d
    return None


def _time(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``reps`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def sparsify(
    model: nn.Module, example_inputs: Any, *, min_speedup: float = 1.1, reps: int = 5, min_sparsity: float = 0.5
) -> dict[str, dict[str, Any]]:
    """Swap every Linear / Conv2d of a converted ``model`` whose CSR form is measured faster on its input.

    ``example_inputs`` (a tensor or a tuple) are run once to capture each layer's real input (the shape
    the deployment uses: the choice depends on it). A layer is swapped when its sparsity is at least
    ``min_sparsity`` and dense time / sparse time ≥ ``min_speedup`` (median of ``reps`` timings each).
    Returns, per candidate layer, ``{"sparsity", "dense_ms", "sparse_ms", "sparse"}``. In place; the
    model stays in eval mode. :func:`desparsify` undoes it.
    """
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PrunqError("sparsify: the model still has masks or weight quantizers; prunq.convert it first")
    candidates = {n: m for n, m in model.named_modules() if _candidate(m) is not None}
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:  # returns None: the output is untouched
            captured.setdefault(name, args[0].detach())

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in candidates.items()]
    was = model.training
    model.eval()
    try:
        model(*(example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)))
    finally:
        for h in hooks:
            h.remove()
    report: dict[str, dict[str, Any]] = {}
    for name, module in candidates.items():
        x = captured.get(name)
        if x is None:
            continue  # not used by this forward
        w = module.weight
        sparsity = float((w == 0).sum()) / w.numel()
        entry: dict[str, Any] = {"sparsity": sparsity, "sparse": False}
        if sparsity >= min_sparsity:
            cls = _candidate(module)
            trial = cls.__new__(cls)
            trial.__dict__ = dict(module.__dict__)
            trial._prunq_csr = _csr(w)
            dense_s = _time(lambda: module(x), reps)
            sparse_s = _time(lambda: trial(x), reps)
            entry.update(dense_ms=1e3 * dense_s, sparse_ms=1e3 * sparse_s)
            if dense_s / sparse_s >= min_speedup:
                module.__class__ = cls
                module._prunq_csr = trial._prunq_csr
                entry["sparse"] = True
        report[name] = entry
    model.train(was)
    return report


def desparsify(model: nn.Module) -> nn.Module:
    """Back to the dense classes (the weights never changed)."""
    for m in model.modules():
        if isinstance(m, (SparseLinear, SparseConv2d)):
            m.__class__ = nn.Linear if isinstance(m, SparseLinear) else nn.Conv2d
            del m._prunq_csr
    return model
