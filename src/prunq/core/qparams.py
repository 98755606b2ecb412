"""Quantization records: what a quantizer *is*, read by the cost model, the manifest and the exporters.

Brevitas's lesson without its machinery: every quantizer (weight or activation, fake-quant or converted)
yields one :class:`QParams`, so nothing downstream re-derives a grid from a weight tensor.

>>> import torch
>>> q = QParams(bits=4, step=torch.tensor([0.5, 0.25]), axis=0, signed=True, narrow=True)
>>> q.qmin, q.qmax, q.levels
(-7, 7, 15)
>>> q.to_meta()
{'bits': 4, 'axis': 0, 'signed': True, 'narrow': True, 'power_of_two': False, 'zero_point': 0}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class QParams:
    """A uniform quantization grid: ``x_q = clamp(round(x / step) + zero_point, qmin, qmax) - zero_point``.

    Attributes:
        bits: bit-width of the integers (2–8).
        step: the effective step(s) used in the forward pass (detached): a scalar per tensor, or one per
            channel along ``axis`` (canonical layout: dim 0 = output channel for weights).
        axis: the channel axis of a per-channel step, or ``None`` (per tensor).
        signed: signed integers (weights, signed activations) or unsigned (activations after ReLU).
        narrow: a signed grid without its most negative level (``-(2^(b-1)-1) … 2^(b-1)-1``), so zero is
            a level and ``-q`` is representable.
        power_of_two: every step is a power of two (shift-only rescaling).
        zero_point: the integer offset; prunq's grids are symmetric (0).
    """

    bits: int
    step: torch.Tensor
    axis: int | None = None
    signed: bool = True
    narrow: bool = True
    power_of_two: bool = False
    zero_point: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def qmin(self) -> int:
        """The smallest integer level."""
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        """The largest integer level."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        """Number of integer levels."""
        return self.qmax - self.qmin + 1

    @property
    def num_steps(self) -> int:
        """How many step values are stored (1 per tensor, or one per channel)."""
        return int(self.step.numel())

    def to_meta(self) -> dict[str, Any]:
        """The grid without its step values (JSON-safe): what a manifest records."""
        return {
            "bits": self.bits, "axis": self.axis, "signed": self.signed, "narrow": self.narrow,
            "power_of_two": self.power_of_two, "zero_point": self.zero_point,
        }  # fmt: skip
