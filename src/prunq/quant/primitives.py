"""Quantization primitives: rounding with a straight-through gradient, integer ranges, fake-quant.

Everything here is a pure function of tensors, so quantizer modules stay short and the gradients can
be checked by hand (``tests/quant/test_primitives.py``).

Conventions (METHOD.md §3): bit-widths 2–8 are quantized; 16 and 32 mean "left in float" (one rule,
:func:`prunq.core.config.check_bits`, re-exported here). Signed grids are *narrow* and symmetric,
``-(2^(b-1) - 1) … 2^(b-1) - 1``, so zero is a level and ``-q`` is always representable; unsigned grids
are ``0 … 2^b - 1``.

Two implementations of the same fake-quant: :func:`fake_quant` (composed autograd ops: the
definition, easy to read) and :func:`lsq_fake_quant` (the fast path the quantizers use: no autograd
graph when no gradient is needed, else one autograd node with a hand-written backward). They give
bit-identical values; the tests check values and gradients against each other.
"""

from __future__ import annotations

import torch

from prunq.core.config import FLOAT_BITS, QUANT_BITS, check_bits

#: Smallest step a quantizer ever uses: a guard against 0 / NaN for all-zero (pruned) channels.
MIN_STEP: float = 1e-8
#: A quantizer's forward implementation: ``"auto"`` (:func:`lsq_fake_quant`) or ``"reference"``
#: (the composed :func:`fake_quant`, for debugging). Same values; same gradients up to float rounding.
IMPLS: tuple[str, ...] = ("auto", "reference")

__all__ = [
    "FLOAT_BITS", "IMPLS", "MIN_STEP", "QUANT_BITS", "check_bits", "fake_quant", "grad_scale", "is_quantized",
    "lsq_fake_quant", "pow2_ste", "qrange", "round_ste",
]  # fmt: skip


def is_quantized(bits: int) -> bool:
    """True when ``bits`` asks for quantization (2–8), False for 16 / 32 (float).

    >>> is_quantized(4), is_quantized(32)
    (True, False)
    """
    return bits in QUANT_BITS


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even) in the forward pass; identity gradient in the backward pass.

    >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
    >>> round_ste(x).sum().backward(); x.grad
    tensor([1., 1.])
    """
    # The detach trick keeps this a plain elementwise expression (no custom autograd.Function), so it
    # fuses under torch.compile and is traced by fx / export as ordinary ops.
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """Value of ``x`` (bit for bit), gradient multiplied by ``s`` (the LSQ step-size gradient scale).

    ``s`` is a number or a tensor broadcasting against ``x`` (one scale per channel).

    >>> x = torch.tensor(2.0, requires_grad=True)
    >>> (grad_scale(x, 0.5) * 3).backward(); x.grad
    tensor(1.5000)
    """
    # ``x.detach() + (xs - xs.detach())`` rather than ``xs + (x - xs).detach()``: the added term is
    # exactly 0, so the value is exactly ``x``; the other form can be off by one ulp, and then the
    # reference and the fast fake-quant would not give bit-identical values.
    xs = x * s
    return x.detach() + (xs - xs.detach())


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


def _dot_same_layout(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum()`` without the product tensor when both are dense in the same memory order."""
    if a.stride() == b.stride() and a.dtype == b.dtype:
        if a.is_contiguous():
            return torch.dot(a.view(-1), b.view(-1))
        if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last):
            return torch.dot(a.permute(0, 2, 3, 1).reshape(-1), b.permute(0, 2, 3, 1).reshape(-1))
    return (a * b).sum()


class _LSQFakeQuant(torch.autograd.Function):
    """:func:`fake_quant` with the LSQ gradients of :func:`grad_scale` ``(step, grad_factor)``, as one node.

    Why: the composed form records about ten autograd nodes and, for an activation, as many full-size
    temporaries; here the forward writes the output, an inside mask and the per-element step gradient
    coefficient in six elementwise passes, and the backward is a multiply and a dot product.
    """

    @staticmethod
    def forward(ctx, x, step, qmin, qmax, grad_factor):  # noqa: D102
        v = x / step
        r = torch.round(v)
        c = r.clamp(qmin, qmax)
        need_x, need_step = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        inside = torch.eq(c, r, out=r)  # "inside" = round(x / step) is a level: 1.0 or 0.0 (reuses r)
        if need_step:
            # d out / d step = round(x/s) - x/s inside, the clipped level outside: c - v * inside (into v).
            coef = torch.addcmul(c, v, inside, value=-1, out=v)
            ctx.save_for_backward(
                inside if need_x else None, coef, step, grad_factor if torch.is_tensor(grad_factor) else None
            )
        else:
            ctx.save_for_backward(inside if need_x else None, None, None, None)
        ctx.grad_factor = None if torch.is_tensor(grad_factor) else float(grad_factor)
        return c.mul_(step)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        inside, coef, step, factor_t = ctx.saved_tensors
        grad_x = grad * inside if inside is not None else None
        grad_step = None
        if coef is not None:
            if step.numel() == 1:
                grad_step = _dot_same_layout(grad, coef).reshape(step.shape)
            else:
                grad_step = (grad * coef).sum_to_size(step.shape)
            grad_step = grad_step * (factor_t if factor_t is not None else ctx.grad_factor)
        return grad_x, grad_step, None, None, None


def lsq_fake_quant(
    x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_factor: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """``fake_quant(x, grad_scale(step, grad_factor), qmin, qmax)``, the fast way; bit-identical values.

    ``step`` broadcasts against ``x`` without enlarging it (a scalar, or one value per channel shaped
    for broadcasting); ``grad_factor`` is a number or a tensor shaped like ``step``. The output keeps
    ``x``'s memory format (channels_last stays channels_last).

    * No gradient needed (``no_grad``, inference, or neither input requires grad): four in-place
      elementwise ops on one new tensor, no autograd record.
    * Otherwise one autograd node (:class:`_LSQFakeQuant`). The gradients equal those of the
      composed :func:`fake_quant` up to float rounding: ``grad_x = grad * inside`` exactly (the
      composed form computes ``(grad * step) / step``), and the step gradient is summed in another
      order.

    Why not torch's fused ``fake_quantize_*`` kernels: they compute ``x * (1 / step)``, which differs
    from ``x / step`` at some rounding ties, so they cannot match the definition bit for bit; on CPU
    they are also slower than these composed ops (``bench/quant_speed.py`` measures both).

    >>> x = torch.tensor([0.3, -1.4, 5.0], requires_grad=True)
    >>> s = torch.tensor(0.5, requires_grad=True)
    >>> y = lsq_fake_quant(x, s, -3, 3, grad_factor=0.1); y
    tensor([ 0.5000, -1.5000,  1.5000], grad_fn=<_LSQFakeQuantBackward>)
    >>> (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward(); x.grad, round(s.grad.item(), 4)
    (tensor([1., 2., 0.]), 0.9)
    """
    if torch.is_grad_enabled() and (x.requires_grad or step.requires_grad):
        return _LSQFakeQuant.apply(x, step, qmin, qmax, grad_factor)
    v = x / step
    return v.round_().clamp_(qmin, qmax).mul_(step)
