"""Pruning masks held as parametrizations: ``W_eff = mask * W``.

The mask is a buffer inside a :mod:`torch.nn.utils.parametrize` parametrization, so state-dict keys
stay stable (``parametrizations.weight.original`` / ``parametrizations.weight.0.mask``), ``print(model)``
shows it, and :func:`bake` writes the masked weight back into the *same* Parameter object, so
optimizers built on the model stay valid.

Two fine-tuning modes (METHOD.md §2):

* ``hard`` -- the forward is ``mask * W``; a pruned weight gets exactly zero gradient.
* ``soft`` -- the forward is still ``mask * W`` but the backward is straight-through: the dense *shadow*
  weight ``W`` receives the full gradient of the effective weight, so a pruned weight keeps learning and
  can come back when its score rises.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunq.core.evalcache import EvalCache


class _StraightThroughMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return w * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


class Mask(nn.Module):
    """Parametrization ``W -> mask * W``; ``soft=True`` passes the gradient straight through.

    >>> lin = nn.Linear(3, 2)
    >>> m = attach_mask(lin)
    >>> set_mask(lin, torch.tensor([[1., 0., 1.], [0., 0., 1.]]))
    >>> int((lin.weight == 0).sum())
    3
    """

    def __init__(self, shape: torch.Size, dtype: torch.dtype = torch.float32, soft: bool = False) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=dtype))
        self.soft = soft
        self._cache = EvalCache()

    def forward(self, w: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.soft and torch.is_grad_enabled():
            return _StraightThroughMask.apply(w, self.mask)
        # Without autograd (eval) the product is reused while W and the mask are unchanged (exact).
        return self._cache(lambda: w * self.mask, w, self.mask)

    def extra_repr(self) -> str:  # noqa: D102
        n = self.mask.numel()
        return f"density={float(self.mask.sum()) / max(n, 1):.4f}, soft={self.soft}"


def get_mask(module: nn.Module, name: str = "weight") -> Mask | None:
    """The :class:`Mask` parametrizing ``module.<name>``, or ``None``."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, Mask):
            return p
    return None


def original(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The stored (shadow) parameter behind ``module.<name>``, parametrized or not."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def attach_mask(module: nn.Module, name: str = "weight", soft: bool = False) -> Mask:
    """Attach an all-ones mask to ``module.<name>`` (idempotent: returns the existing one).

    A mask must come first in the parametrization list, so that quantization sees ``mask * W``.
    """
    existing = get_mask(module, name)
    if existing is not None:
        existing.soft = soft
        return existing
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{name!r} already has parametrizations; attach the mask before quantizing")
    w = getattr(module, name)
    m = Mask(w.shape, dtype=w.dtype, soft=soft).to(w.device)
    parametrize.register_parametrization(module, name, m)
    return m


def share_mask(module: nn.Module, mask: Mask, name: str = "weight") -> None:
    """Register an existing :class:`Mask` on another user of the same (tied) Parameter.

    Every user then computes ``mask * W`` from one mask buffer, so a cut or ``zero_pruned_`` on one is
    seen by all (:func:`prunq.core.sharing.shared_weight_users` finds them).
    """
    if get_mask(module, name) is mask:
        return
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{name!r} already has parametrizations; share the mask before quantizing")
    w = getattr(module, name)
    if w.shape != mask.mask.shape:
        raise ValueError(f"weight shape {tuple(w.shape)} != mask shape {tuple(mask.mask.shape)}")
    parametrize.register_parametrization(module, name, mask)


def set_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Replace the mask values (shape of the stored weight; any dtype, non-zero = keep)."""
    m = get_mask(module, name)
    if m is None:
        raise ValueError("module has no mask; call attach_mask first")
    if mask.shape != m.mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(m.mask.shape)}")
    m.mask.copy_((mask != 0).to(m.mask.dtype))


@torch.no_grad()
def zero_pruned_(module: nn.Module, name: str = "weight") -> None:
    """Set the shadow values of pruned weights to exactly zero (end of soft mode, and hard mode)."""
    m = get_mask(module, name)
    if m is not None:
        original(module, name).mul_(m.mask)


def set_soft(model: nn.Module, soft: bool) -> None:
    """Switch every mask in ``model`` between soft and hard mode."""
    for mod in model.modules():
        m = get_mask(mod)
        if m is not None:
            m.soft = soft


@torch.no_grad()
def bake(module: nn.Module, name: str = "weight") -> None:
    """Write the effective weight into the original Parameter and remove all its parametrizations."""
    if parametrize.is_parametrized(module, name):
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def masked_modules(model: nn.Module) -> list[tuple[str, nn.Module, Mask]]:
    """``(name, module, mask)`` for every masked weight in ``model``."""
    out = []
    for name, mod in model.named_modules():
        m = get_mask(mod)
        if m is not None:
            out.append((name, mod, m))
    return out


def sparsity(model: nn.Module) -> float:
    """Fraction of masked-out weights over all masked tensors (0.0 when nothing is masked).

    A tensor shared by several modules (tied weights) counts once.
    """
    total = 0
    kept = 0.0
    seen: set[int] = set()
    for _, mod, m in masked_modules(model):
        key = id(original(mod))
        if key in seen:
            continue
        seen.add(key)
        total += m.mask.numel()
        kept += float(m.mask.sum())
    return 1.0 - kept / total if total else 0.0
