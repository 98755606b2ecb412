"""Quantization primitives: rounding with a straight-through gradient, integer ranges, fake-quant.

Everything here is a pure function of tensors, so quantizer modules stay short and the gradients can
be checked by hand (``tests/test_quant_primitives.py``).

Conventions (METHOD.md §3): bit-widths 2–8 are quantized; 16 and 32 mean "left in float".
Signed grids are *narrow* and symmetric, ``-(2^(b-1) - 1) … 2^(b-1) - 1``, so zero is a level and
``-q`` is always representable; unsigned grids are ``0 … 2^b - 1``.
"""

from __future__ import annotations

import torch

from prunq.core.errors import PrunqError

#: Bit-widths that mean "not quantized".
FLOAT_BITS: frozenset[int] = frozenset({16, 32})
#: Bit-widths that are quantized.
QUANT_BITS: frozenset[int] = frozenset(range(2, 9))
#: Smallest step a quantizer ever uses: a guard against 0 / NaN for all-zero (pruned) channels.
MIN_STEP: float = 1e-8


def is_quantized(bits: int) -> bool:
    """True when ``bits`` asks for quantization (2–8), False for 16 / 32 (float).

    >>> is_quantized(4), is_quantized(32)
    (True, False)
    """
    return bits in QUANT_BITS


def check_bits(bits: object, field: str = "bits") -> int:
    """Return ``bits`` if it is 2–8, 16 or 32; otherwise raise :class:`PrunqError` naming ``field``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (bits in QUANT_BITS or bits in FLOAT_BITS):
        raise PrunqError(f"{field}: {bits!r} is outside 2–8 (16 or 32 = not quantized)")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even) in the forward pass; identity gradient in the backward pass.

    >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
    >>> round_ste(x).sum().backward(); x.grad
    tensor([1., 1.])
    """
    # The detach trick keeps this a plain elementwise expression (no custom autograd.Function), so it
    # fuses under torch.compile and is traced by fx / export as ordinary ops.
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, s: float) -> torch.Tensor:
    """Value of ``x``, gradient multiplied by ``s`` (the LSQ step-size gradient scale).

    >>> x = torch.tensor(2.0, requires_grad=True)
    >>> (grad_scale(x, 0.5) * 3).backward(); x.grad
    tensor(1.5000)
    """
    xs = x * s
    return xs + (x - xs).detach()


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)``: signed narrow symmetric or unsigned.

    >>> qrange(2, True), qrange(8, True), qrange(4, False)
    ((-1, 1), (-127, 127), (0, 15))
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits} is not a quantized bit-width (2–8)")
    if signed:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def fake_quant(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / step), qmin, qmax) * step`` with STE / LSQ gradients.

    Gradient to ``x``: 1 inside the clip range, 0 outside. Gradient to ``step`` (LSQ):
    ``round(x/step) - x/step`` inside, ``qmin`` / ``qmax`` where clipped. "Inside" means
    ``qmin <= round(x/step) <= qmax`` -- the convention of torch's fused fake-quant kernels, so the
    two can be swapped. ``step`` broadcasts against ``x`` (a scalar, or one value per channel).

    >>> fake_quant(torch.tensor([0.26, -0.9, 3.0]), torch.tensor(0.25), -3, 3)
    tensor([ 0.2500, -0.7500,  0.7500])
    """
    return torch.clamp(round_ste(x / step), qmin, qmax) * step


def pow2_ste(step: torch.Tensor) -> torch.Tensor:
    """Round a positive step to the nearest power of two, ``2 ** round(log2 step)``; identity gradient.

    Rounding is done in the log domain, so 0.7 -> 0.5 and 0.75 -> 1.0 (log2 0.75 = -0.415).

    >>> pow2_ste(torch.tensor([0.3, 0.7, 3.0]))
    tensor([0.2500, 0.5000, 4.0000])
    """
    p2 = torch.exp2(torch.round(torch.log2(step)))
    return step + (p2 - step).detach()
