"""Weight fake-quantization as a parametrization registered after the pruning mask: ``W_eff = Q(mask * W)``.

The grid is symmetric, signed and narrow (METHOD.md §3), with one step per output channel (canonical
dim 0, so ConvTranspose and grouped layers are right) or one per tensor. Zero is a level, so pruned
weights stay exactly zero whatever the step.

>>> from torch import nn
>>> from torch.nn.utils import parametrize
>>> lin = nn.Linear(4, 2)
>>> q = WeightQuantizer(lin, bits=2)
>>> _ = parametrize.register_parametrization(lin, "weight", q)
>>> bool(((lin.weight / q.effective_step()[:, None]).abs() <= 1).all())
True
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunq.core.errors import PrunqError
from prunq.core.evalcache import EvalCache
from prunq.core.layers import from_canonical, is_compressible, out_channels, to_canonical
from prunq.core.qparams import QParams
from prunq.quant.primitives import (
    IMPLS,
    MIN_STEP,
    fake_quant,
    grad_scale,
    is_quantized,
    lsq_fake_quant,
    pow2_ste,
    qrange,
)

WEIGHT_INITS: tuple[str, ...] = ("max", "mse")
#: What ``N`` counts in the LSQ step-gradient scale ``1 / sqrt(N * Qp)``: every weight of the step's
#: channel, or only its non-zero ones (the weights a pruned channel still has).
GRAD_NS: tuple[str, ...] = ("all", "nonzero")
#: Clipping ratios (of max |w|) tried by the MSE initialisation.
MSE_GRID: int = 100


def _layout_proxy(module: nn.Module) -> nn.Module | None:
    """A weightless stand-in that makes :func:`to_canonical` treat tensors like ``module``'s weight.

    A parametrization must not hold its own layer (a reference cycle that ``state_dict`` and
    ``deepcopy`` would walk), yet ``to_canonical`` needs a module to know the layout. Only the
    transposed-conv type and ``groups`` matter there, so a meta-device ConvTranspose1d carries them.
    """
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        g = int(module.groups)
        return nn.ConvTranspose1d(g, g, 1, groups=g, bias=False, device="meta")
    return None


def _fill_dead(step: torch.Tensor) -> torch.Tensor:
    """Give all-zero (pruned) channels the smallest live step, or MIN_STEP: never 0 or NaN."""
    live = torch.isfinite(step) & (step > 0)
    fill = step[live].min() if bool(live.any()) else step.new_tensor(MIN_STEP)
    return torch.where(live, step, fill).clamp_min(MIN_STEP)


def mse_steps(
    rows: torch.Tensor, qmin: int, qmax: int, power_of_two: bool = False, grid: int = MSE_GRID
) -> torch.Tensor:
    """One step per row of ``rows`` minimising ``||Q(row) - row||^2`` over clipping ratios of max |row|.

    Ratio 1.0 (the max initialisation) is in the grid, so the result is never worse than max.
    """
    amax = rows.abs().amax(dim=1)
    best = torch.full_like(amax, float("inf"))
    best_step = (amax / qmax).clamp_min(MIN_STEP)
    for r in torch.linspace(1.0 / grid, 1.0, grid).tolist():
        s = (amax * r / qmax).clamp_min(MIN_STEP)
        if power_of_two:
            s = torch.exp2(torch.round(torch.log2(s)))
        err = (torch.clamp(torch.round(rows / s[:, None]), qmin, qmax) * s[:, None] - rows).pow(2).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        best_step = torch.where(better, s, best_step)
    # Rows that are all zero keep amax/qmax = 0 here; _fill_dead repairs them.
    return torch.where(amax > 0, best_step, torch.zeros_like(best_step))


class WeightQuantizer(nn.Module):
    """Parametrization ``w -> step * clamp(round(w / step), -Qp, Qp)`` with ``Qp = 2^(b-1) - 1``.

    Args:
        module: the layer whose ``weight`` this will parametrize (read for shape, layout and init;
            not stored).
        bits: 2–8.
        per_channel: one step per output channel (canonical dim 0) instead of one per tensor.
        init: ``"max"`` (``max|w| / Qp``) or ``"mse"`` (best clipping ratio by squared error).
        learn: learn the step (LSQ, gradient scaled by ``1 / sqrt(N * Qp)``); else frozen.
        power_of_two: round the step to a power of two in the forward pass (shift-only rescaling).
        grad_n: ``N`` of the LSQ scale. ``"all"``: the weights per step, pruned zeros included.
            ``"nonzero"``: the non-zero weights of each step's channel in the quantizer's input (at
            least 1), counted every forward; at 98 % sparsity ``"all"`` makes the step gradient about
            7x smaller than the weights that are left would.
        impl: ``"auto"`` (:func:`~prunq.quant.primitives.lsq_fake_quant`) or ``"reference"`` (the
            composed :meth:`reference_forward`, for debugging). Same values bit for bit; same gradients
            up to float rounding.

    Register it *after* any mask so that it quantizes ``mask * W``. The step is initialised from
    ``module.weight`` at construction (the masked weight if a mask is registered); call
    :meth:`init_from` again after the weights change.
    """

    def __init__(
        self,
        module: nn.Module,
        bits: int,
        per_channel: bool = True,
        init: str = "max",
        learn: bool = True,
        power_of_two: bool = False,
        grad_n: str = "all",
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if not is_compressible(module):
            raise PrunqError(f"WeightQuantizer: {type(module).__name__} is not a compressible layer")
        if not is_quantized(bits):
            raise PrunqError(f"WeightQuantizer: bits={bits} is outside 2–8")
        if init not in WEIGHT_INITS:
            raise PrunqError(f"WeightQuantizer: init={init!r} is not one of {WEIGHT_INITS}")
        if grad_n not in GRAD_NS:
            raise PrunqError(f"WeightQuantizer: grad_n={grad_n!r} is not one of {GRAD_NS}")
        if impl not in IMPLS:
            raise PrunqError(f"WeightQuantizer: impl={impl!r} is not one of {IMPLS}")
        self.bits = bits
        self.qmin, self.qmax = qrange(bits, signed=True)
        self.per_channel = per_channel
        self.init = init
        self.learn = learn
        self.power_of_two = power_of_two
        self.grad_n = grad_n
        self.impl = impl
        object.__setattr__(self, "_proxy", _layout_proxy(module))  # not a submodule: see _layout_proxy
        w = module.weight.detach()
        n = out_channels(module) if per_channel else 1
        self.step = nn.Parameter(torch.ones(n, dtype=w.dtype, device=w.device), requires_grad=learn)
        self._cache = EvalCache()
        self.init_from(w)

    # -- layout ---------------------------------------------------------------------------------------
    def _canon(self, w: torch.Tensor) -> torch.Tensor:
        return w if self._proxy is None else to_canonical(w, self._proxy)

    def _uncanon(self, c: torch.Tensor) -> torch.Tensor:
        return c if self._proxy is None else from_canonical(c, self._proxy)

    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        """Canonical weight as ``(number of steps, weights per step)``."""
        return self._canon(w).reshape(self.step.numel(), -1)

    # -- step -----------------------------------------------------------------------------------------
    def _live_step(self) -> torch.Tensor:
        # Clamp before the log2 of power-of-two: a learned step may drift to <= 0. Both pass the gradient.
        # learn=False stays frozen even if model.requires_grad_(True) flipped the Parameter's flag.
        s = (self.step if self.learn else self.step.detach()).clamp_min(MIN_STEP)
        return pow2_ste(s) if self.power_of_two else s

    def _grad_factor(self, c: torch.Tensor) -> float | torch.Tensor:
        """The LSQ step-gradient scale ``1 / sqrt(N * Qp)`` for the canonical input ``c`` (see ``grad_n``)."""
        n = self.step.numel()
        if self.grad_n == "all":
            return 1.0 / math.sqrt((c.numel() // n) * self.qmax)
        nonzero = torch.count_nonzero(c.detach().reshape(n, -1), dim=1).clamp_min(1)
        return (nonzero.to(self.step.dtype) * self.qmax).rsqrt()

    def _needs_step_grad(self) -> bool:
        return self.learn and self.step.requires_grad and torch.is_grad_enabled()

    def effective_step(self) -> torch.Tensor:
        """The step used in the forward pass (clamped, power-of-two rounded), detached: shape (out,) or (1,)."""
        return self._live_step().detach()

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """Set the step from ``w`` (the quantizer's *input*, i.e. the masked weight) by max or MSE."""
        rows = self._rows(w.detach()).to(self.step.dtype)
        if self.init == "mse":
            step = mse_steps(rows, self.qmin, self.qmax, self.power_of_two)
        else:
            step = rows.abs().amax(dim=1) / self.qmax
        self.step.copy_(_fill_dead(step))

    # -- forward / export -----------------------------------------------------------------------------
    def forward(self, w: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.impl == "reference":
            return self.reference_forward(w)
        # Without autograd (eval) the grid is reused while the input and the step are unchanged (exact).
        return self._cache(lambda: self._forward(w), w, self.step)

    def _forward(self, w: torch.Tensor) -> torch.Tensor:
        c = self._canon(w)
        step, factor = self._live_step(), 1.0
        if self._needs_step_grad():
            factor = self._grad_factor(c)
        if step.numel() > 1:  # one step per canonical row
            shape = (-1, *([1] * (c.dim() - 1)))
            step = step.view(shape)
            factor = factor.view(shape) if torch.is_tensor(factor) else factor
        return self._uncanon(lsq_fake_quant(c, step, self.qmin, self.qmax, factor))

    def reference_forward(self, w: torch.Tensor) -> torch.Tensor:
        """The composed forward (the definition): ``impl="auto"`` matches it in values and gradients."""
        c = self._canon(w)
        s = self.step if self.learn else self.step.detach()
        if self._needs_step_grad():
            s = grad_scale(s, self._grad_factor(c))
        s = s.clamp_min(MIN_STEP)
        step = pow2_ste(s) if self.power_of_two else s
        if step.numel() > 1:
            step = step.view(-1, *([1] * (c.dim() - 1)))
        return self._uncanon(fake_quant(c, step, self.qmin, self.qmax))

    @torch.no_grad()
    def int_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Integer levels (int8) of ``w``, in ``w``'s own layout: ``Q(w) == int_weight(w) * step``."""
        c = self._canon(w)
        step = self.effective_step()
        if step.numel() > 1:
            step = step.view(-1, *([1] * (c.dim() - 1)))
        q = torch.clamp(torch.round(c / step), self.qmin, self.qmax).to(torch.int8)
        return self._uncanon(q)

    def qparams(self) -> QParams:
        """The grid: signed, narrow, the effective (detached) step per output channel (axis 0) or per tensor.

        >>> q = WeightQuantizer(nn.Conv2d(2, 3, 1), bits=4)
        >>> p = q.qparams(); p.axis, p.qmin, p.qmax, tuple(p.step.shape)
        (0, -7, 7, (3,))
        """
        return QParams(
            bits=self.bits, step=self.effective_step(), axis=0 if self.per_channel else None, signed=True,
            narrow=True, power_of_two=self.power_of_two,
        )  # fmt: skip

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"bits={self.bits}, per_channel={self.per_channel}, init={self.init!r}, "
            f"learn={self.learn}, power_of_two={self.power_of_two}, grad_n={self.grad_n!r}"
            + (", impl='reference'" if self.impl == "reference" else "")
        )


def weight_quantizer(module: nn.Module) -> WeightQuantizer | None:
    """The :class:`WeightQuantizer` parametrizing ``module.weight``, or ``None``."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, WeightQuantizer):
            return p
    return None
