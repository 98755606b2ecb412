"""Per-tensor fake-quantization of a compressed layer's *input* activation (METHOD.md §3).

Life cycle: :meth:`ActQuantizer.observe` -> forwards (statistics collected, input passed through) ->
:meth:`ActQuantizer.finish_calibration` (chooses signed/unsigned and the step) -> quantizing forwards,
optionally learning the step (LSQ). All state that changes the output (``step``, ``signed``,
``calibrated``) is in the ``state_dict``, so a fresh instance loads it and quantizes identically.

>>> q = ActQuantizer(bits=4, calibration="max")
>>> q.observe(); _ = q(torch.tensor([0.0, 1.5, 3.0])); q.finish_calibration()
>>> bool(q.signed), round(q.step.item(), 4)   # non-negative input -> unsigned 0..15
(False, 0.2)
>>> with torch.no_grad():
...     q(torch.tensor([0.45, 9.0]))
tensor([0.4000, 3.0000])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunq.core.config import check_percentile
from prunq.core.errors import PrunqError
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
from prunq.quant.weight import mse_steps

CALIBRATIONS: tuple[str, ...] = ("percentile", "max", "mse")


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer: unsigned ``0 … 2^b-1`` or signed narrow ``±(2^(b-1)-1)``.

    Args:
        bits: 2–8.
        calibration: ``"percentile"`` (clip at that percentile of |x|), ``"max"`` or ``"mse"``
            (clip minimising squared quantization error on the observed sample).
        percentile: for ``"percentile"``, in (0, 100].
        learn: learn the step after calibration (LSQ, gradient scaled by ``1/sqrt(N * Qp)`` with
            ``N`` the elements of one sample); else the step is frozen.
        power_of_two: round the step to a power of two in the forward pass.
        max_samples: bound on the values kept for percentile / MSE (min and max are always exact).
        impl: ``"auto"`` (:func:`~prunq.quant.primitives.lsq_fake_quant`: no autograd record when no
            gradient is needed, one hand-written node otherwise) or ``"reference"`` (the composed
            :meth:`reference_forward`, for debugging). Same values bit for bit; same gradients up to
            float rounding.
    """

    def __init__(
        self,
        bits: int,
        calibration: str = "percentile",
        percentile: float = 99.99,
        learn: bool = True,
        power_of_two: bool = False,
        max_samples: int = 1 << 18,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if not is_quantized(bits):
            raise PrunqError(f"ActQuantizer: bits={bits} is outside 2–8")
        if calibration not in CALIBRATIONS:
            raise PrunqError(f"ActQuantizer: calibration={calibration!r} is not one of {CALIBRATIONS}")
        check_percentile(percentile, "ActQuantizer.percentile")
        if impl not in IMPLS:
            raise PrunqError(f"ActQuantizer: impl={impl!r} is not one of {IMPLS}")
        self.bits = bits
        self.calibration = calibration
        self.percentile = float(percentile)
        self.learn = learn
        self.power_of_two = power_of_two
        self.max_samples = int(max_samples)
        self.impl = impl
        self.step = nn.Parameter(torch.tensor(1.0), requires_grad=learn)
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("calibrated", torch.tensor(False))
        self._observing = False
        self._reset_stats()
        self._sync()

    # -- cached python copies of the buffers (reading a tensor flag every forward would sync a GPU) ----
    def _sync(self) -> None:
        self._ready = bool(self.calibrated)
        self.qmin, self.qmax = qrange(self.bits, signed=bool(self.signed))

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: D102
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()

    # -- calibration ----------------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        self._min = math.inf
        self._max = -math.inf
        self._sample: torch.Tensor | None = None
        self._calls = 0
        self._subsampled = False
        self._gen: torch.Generator | None = None

    def observe(self) -> None:
        """Start collecting statistics: following forwards record the input and return it unchanged."""
        self._reset_stats()
        self._observing = True

    def stop_observing(self) -> None:
        """Abandon an observation (statistics dropped, previous calibration kept)."""
        self._observing = False
        self._reset_stats()

    @property
    def observed_calls(self) -> int:
        """Forward calls recorded since :meth:`observe` (0 when not observing)."""
        return self._calls

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).float()
        if x.numel() == 0:
            return
        self._min = min(self._min, float(x.min()))
        self._max = max(self._max, float(x.max()))
        if self._gen is None or self._gen.device != x.device:
            self._gen = torch.Generator(device=x.device).manual_seed(0)  # deterministic calibration
        new = self._take(x, self.max_samples)
        if self._sample is None:
            self._sample = new
        else:
            # Equal weight per forward call: keep k/(k+1) of the pool and 1/(k+1) of the new values.
            k = self._calls
            keep = self.max_samples * k // (k + 1)
            pool = (
                self._take(self._sample, keep)
                if self._sample.numel() + new.numel() > self.max_samples
                else self._sample
            )
            new = self._take(new, self.max_samples - pool.numel())
            self._sample = torch.cat([pool, new])
        self._calls += 1

    def _take(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if x.numel() <= n:
            return x
        self._subsampled = True
        idx = torch.randperm(x.numel(), generator=self._gen, device=x.device)[:n]
        return x[idx]

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Choose signed/unsigned from the observed minimum and the step; switch to quantizing."""
        if self._sample is None:
            raise RuntimeError(
                "ActQuantizer.finish_calibration(): no input was observed; call observe() and run forwards first"
            )
        signed = self._min < 0
        self.signed.fill_(signed)
        self._sync()  # qmin / qmax of the chosen grid, needed by _clip_step
        self.step.copy_(torch.tensor(self._clip_step(), dtype=self.step.dtype))
        self.calibrated.fill_(True)
        self._observing = False
        self._reset_stats()
        self._sync()

    def _clip_step(self) -> float:
        """The step chosen by the calibration method (python float, >= MIN_STEP)."""
        amax = max(abs(self._min), abs(self._max)) if self._min < 0 else max(self._max, 0.0)
        if self.calibration == "max" or amax == 0.0:
            return max(amax / self.qmax, MIN_STEP)
        sample = self._sample
        if self._subsampled:  # the extremes may have been dropped by sampling; put them back
            sample = torch.cat([sample, sample.new_tensor([self._min, self._max])])
        if self.calibration == "percentile":
            clip = float(torch.quantile(sample.abs().double(), self.percentile / 100.0))
            return max(clip / self.qmax, MIN_STEP)
        rows = sample.view(1, -1) if self._min < 0 else sample.clamp_min(0).view(1, -1)
        return max(float(mse_steps(rows, self.qmin, self.qmax, self.power_of_two)[0]), MIN_STEP)

    # -- forward --------------------------------------------------------------------------------------
    def effective_step(self) -> torch.Tensor:
        """The step used in the forward pass (clamped, power-of-two rounded), detached scalar."""
        return self._live_step().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self._observing:
            self._observe(x)
            return x
        if not self._ready:
            raise RuntimeError(
                "ActQuantizer is not calibrated: run prunq.quant.calibrate(model, batches) "
                "(or observe(), forwards, finish_calibration()) before quantized forwards"
            )
        if self.impl == "reference":
            return self.reference_forward(x)
        step = self._live_step()
        factor = self._lsq_scale(x) if step.requires_grad and torch.is_grad_enabled() else 1.0
        # Elementwise, so the output keeps x's memory format (channels_last in, channels_last out):
        # a contiguous result would make every following conv convert back.
        return lsq_fake_quant(x, step, self.qmin, self.qmax, factor)

    def _lsq_scale(self, x: torch.Tensor) -> float:
        # N = elements of one sample: the loss is a batch mean, so summing the step gradient over the
        # batch behaves like one sample's features (the "N_F" of the LSQ paper).
        n = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(max(n, 1) * self.qmax)

    def _live_step(self) -> torch.Tensor:
        # Clamp before log2: a learned step may drift to <= 0. Both ops pass the gradient through.
        # learn=False stays frozen even if model.requires_grad_(True) flipped the Parameter's flag.
        s = (self.step if self.learn else self.step.detach()).clamp_min(MIN_STEP)
        return pow2_ste(s) if self.power_of_two else s

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The composed LSQ forward (the definition): ``impl="auto"`` matches it in values and gradients."""
        return fake_quant(x, grad_scale(self._live_step(), self._lsq_scale(x)), self.qmin, self.qmax)

    def qparams(self) -> QParams:
        """The grid: per tensor, the effective (detached, scalar) step; signed narrow or unsigned ``0 … 2^b-1``.

        >>> q = ActQuantizer(bits=4, calibration="max")
        >>> q.observe(); _ = q(torch.tensor([-1.0, 3.5])); q.finish_calibration()
        >>> p = q.qparams(); p.qmin, p.qmax, p.step
        (-7, 7, tensor(0.5000))
        """
        signed = bool(self.signed)
        return QParams(
            bits=self.bits, step=self.effective_step(), axis=None, signed=signed, narrow=signed,
            power_of_two=self.power_of_two,
        )  # fmt: skip

    def extra_repr(self) -> str:  # noqa: D102
        state = (
            f"signed={bool(self.signed)}, step={float(self.effective_step()):.4g}" if self._ready else "uncalibrated"
        )
        impl = ", impl='reference'" if self.impl == "reference" else ""
        return f"bits={self.bits}, calibration={self.calibration!r}, learn={self.learn}, power_of_two={self.power_of_two}{impl}, {state}"
