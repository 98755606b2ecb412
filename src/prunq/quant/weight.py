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
from prunq.core.layers import is_compressible, out_channels, to_canonical, from_canonical
from prunq.quant.primitives import MIN_STEP, fake_quant, grad_scale, is_quantized, pow2_ste, qrange

WEIGHT_INITS: tuple[str, ...] = ("max", "mse")
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


def mse_steps(rows: torch.Tensor, qmin: int, qmax: int, power_of_two: bool = False, grid: int = MSE_GRID) -> torch.Tensor:
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


#: Use torch's fused learnable fake-quant kernels in the forward pass (set False to debug with the
#: composed reference implementation).
_FUSED: bool = True


class WeightQuantizer(nn.Module):
    """Parametrization ``w -> step * clamp(round(w / step), -Qp, Qp)`` with ``Qp = 2^(b-1) - 1``.

    Args:
        module: the layer whose ``weight`` this will parametrize (read for shape, layout and init;
            not stored).
        bits: 2–8.
        per_channel: one step per output channel (canonical dim 0) instead of one per tensor.
        init: ``"max"`` (``max|w| / Qp``) or ``"mse"`` (best clipping ratio by squared error).
        learn: learn the step (LSQ, gradient scaled by ``1 / sqrt(N_per_step * Qp)``); else frozen.
        power_of_two: round the step to a power of two in the forward pass (shift-only rescaling).

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
    ) -> None:
        super().__init__()
        if not is_compressible(module):
            raise PrunqError(f"WeightQuantizer: {type(module).__name__} is not a compressible layer")
        if not is_quantized(bits):
            raise PrunqError(f"WeightQuantizer: bits={bits} is outside 2–8")
        if init not in WEIGHT_INITS:
            raise PrunqError(f"WeightQuantizer: init={init!r} is not one of {WEIGHT_INITS}")
        self.bits = bits
        self.qmin, self.qmax = qrange(bits, signed=True)
        self.per_channel = per_channel
        self.init = init
        self.learn = learn
        self.power_of_two = power_of_two
        object.__setattr__(self, "_proxy", _layout_proxy(module))  # not a submodule: see _layout_proxy
        w = module.weight.detach()
        n = out_channels(module) if per_channel else 1
        self.step = nn.Parameter(torch.ones(n, dtype=w.dtype, device=w.device), requires_grad=learn)
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
    def _step(self, per_step: int | None = None) -> torch.Tensor:
        s = self.step
        if self.learn and per_step is not None and torch.is_grad_enabled():
            s = grad_scale(s, 1.0 / math.sqrt(per_step * self.qmax))
        # Clamp before the log2 of power-of-two: a learned step may drift to <= 0.
        s = s.clamp_min(MIN_STEP)
        return pow2_ste(s) if self.power_of_two else s

    def effective_step(self) -> torch.Tensor:
        """The step used in the forward pass (clamped, power-of-two rounded), detached: shape (out,) or (1,)."""
        return self._step().detach()

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
        c = self._canon(w)
        n = self.step.numel()
        if _FUSED and not self.power_of_two and c.is_contiguous():
            # One fused kernel (forward and backward) instead of ~8 small ops: on a small CNN the
            # per-op overhead dominates the training step. Same STE and LSQ gradients (tested).
            factor = 1.0 / math.sqrt((c.numel() // n) * self.qmax) if self.learn else 1.0
            step = self.step.clamp_min(MIN_STEP)
            if not self.learn:
                step = step.detach()
            zp = torch.zeros(n, dtype=c.dtype, device=c.device)
            if n > 1:
                q = torch._fake_quantize_learnable_per_channel_affine(c, step, zp, 0, self.qmin, self.qmax, factor)
            else:
                q = torch._fake_quantize_learnable_per_tensor_affine(c, step, zp, self.qmin, self.qmax, factor)
            return self._uncanon(q)
        return self.reference_forward(w)

    def reference_forward(self, w: torch.Tensor) -> torch.Tensor:
        """The composed (unfused) forward; the fused path must match it in values and gradients."""
        c = self._canon(w)
        n = self.step.numel()
        step = self._step(c.numel() // n)
        if n > 1:
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

    def qparams(self) -> dict:
        """``{"bits", "step", "per_channel", "power_of_two"}``; ``step`` is the effective, detached step."""
        return {
            "bits": self.bits,
            "step": self.effective_step(),
            "per_channel": self.per_channel,
            "power_of_two": self.power_of_two,
        }

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"bits={self.bits}, per_channel={self.per_channel}, init={self.init!r}, "
            f"learn={self.learn}, power_of_two={self.power_of_two}"
        )


def weight_quantizer(module: nn.Module) -> WeightQuantizer | None:
    """The :class:`WeightQuantizer` parametrizing ``module.weight``, or ``None``."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, WeightQuantizer):
            return p
    return None
