"""Which layers prunq compresses, and a canonical view of their weights.

Every compressible weight is viewed as ``(out_channels, in_channels_per_group, *kernel)`` -- the
*canonical* layout -- whatever its module stores (``ConvTranspose`` keeps ``(in, out/groups, *k)``).
Granularities, per-channel quantizers and the cost model all work on that one layout, so a grouped
transposed convolution is handled by the same code as a Linear.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from prunq.core.errors import PrunqError

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
COMPRESSIBLE: tuple[type[nn.Module], ...] = (*_CONV, *_CONV_T, nn.Linear)


def is_compressible(module: nn.Module) -> bool:
    """True for the layer types whose ``weight`` prunq prunes and quantizes (METHOD.md §2)."""
    return isinstance(module, COMPRESSIBLE)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Shell-style name match (``fnmatch``): ``"fc*"``, ``"*.conv1"``, ``"layer1.*"``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_patterns(model: nn.Module, patterns: Iterable[str], field: str) -> None:
    """Every name pattern must match at least one compressible layer; a typo is an error naming it
    (it would otherwise be silently ignored and the resolved recipe would record it as if it applied)."""
    names = [n for n, m in model.named_modules() if is_compressible(m)]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise PrunqError(f"{field}: pattern {pat!r} matches no layer (layers: {', '.join(names[:6])}"
                             + (", ..." if len(names) > 6 else "") + ")")


def compressible_layers(model: nn.Module, exclude: Iterable[str] = ()) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every compressible layer not excluded by name pattern.

    >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    >>> [n for n, _ in compressible_layers(m)]
    ['0', '3']
    """
    exclude = list(exclude)
    for name, module in model.named_modules():
        if is_compressible(module) and not matches(name, exclude):
            yield name, module


def _groups(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1))


def out_channels(module: nn.Module) -> int:
    """Number of output channels (rows of the canonical view)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(module.out_channels)


def input_count(module: nn.Module) -> int:
    """Input channels (features for a Linear) of a compressible layer."""
    return int(module.in_features if isinstance(module, nn.Linear) else module.in_channels)


def channel_dim(module: nn.Module, ndim: int) -> int:
    """Channel dim of a layer's ``ndim``-D input/output: last for a Linear; before the spatial dims for a conv."""
    return ndim - 1 if isinstance(module, nn.Linear) else ndim - len(module.kernel_size) - 1


def canonical_shape(module: nn.Module, shape: torch.Size | None = None) -> tuple[int, ...]:
    """Shape of the canonical view ``(out, in_per_group, *kernel)`` of ``module.weight``."""
    shape = tuple(shape if shape is not None else stored_weight(module).shape)
    if isinstance(module, _CONV_T):
        g = _groups(module)
        in_ch, out_pg, *k = shape
        return (out_pg * g, in_ch // g, *k)
    return shape


def stored_weight(module: nn.Module) -> torch.Tensor:
    """The tensor ``module`` stores as its weight: the parametrization's ``original`` when parametrized.

    Under a parametrization, ``module.weight`` recomputes the effective weight; the stored one has the
    same shape, device and dtype and identifies the tensor (shared weights, memory counted once).
    """
    p = getattr(module, "parametrizations", None)
    if p is not None and "weight" in p:
        return p["weight"].original
    return module.weight


def to_canonical(w: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """View a weight stored in ``module``'s layout as ``(out, in_per_group, *kernel)`` (a copy only for ConvTranspose)."""
    if isinstance(module, _CONV_T):
        g = _groups(module)
        in_ch, out_pg, *k = w.shape
        w = w.reshape(g, in_ch // g, out_pg, *k).transpose(1, 2)
        return w.reshape(g * out_pg, in_ch // g, *k)
    return w


def from_canonical(c: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Inverse of :func:`to_canonical`."""
    if isinstance(module, _CONV_T):
        g = _groups(module)
        out, in_pg, *k = c.shape
        c = c.reshape(g, out // g, in_pg, *k).transpose(1, 2)
        return c.reshape(g * in_pg, out // g, *k)
    return c


def forward_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Dense multiply-accumulates of one forward of ``module``, for the *whole* input (every sample).

    Conv / Linear: output elements x weights per output element. ConvTranspose: every input element
    is multiplied by ``out/groups * prod(kernel)`` weights (the scatter count; with ``padding > 0`` it
    includes the products that land in the cropped border, as Conv counts those on zero padding).
    No batch is guessed here: a layer input's first dimension is not the batch for a sequence-first
    ``(T, B, D)`` or a reshaped ``(B*T, D)`` input, so the caller divides the model's total by the
    example batch once (:func:`prunq.cost.macs.count_macs`).

    >>> conv = nn.Conv2d(4, 2, 3)
    >>> x = torch.zeros(3, 4, 5, 5)
    >>> forward_macs(conv, x, conv(x))  # 3 samples x (2 x 3 x 3 outputs) x (4 x 3 x 3 weights)
    1944
    """
    w = stored_weight(module)
    if isinstance(module, _CONV_T):
        return inp.numel() * w.shape[1] * math.prod(w.shape[2:])
    return out.numel() * w[0].numel()


def is_unbatched_input(module: nn.Module, inp: torch.Tensor) -> bool:
    """True when ``inp`` is certainly one sample without a batch dimension.

    Conv layers accept ``(C, *spatial)`` (rank one less than the weight's); a Linear called on a
    vector is unbatched too. Any other Linear input is ambiguous, hence False.
    """
    if isinstance(module, (*_CONV, *_CONV_T)):
        return inp.dim() == stored_weight(module).dim() - 1
    return inp.dim() == 1
