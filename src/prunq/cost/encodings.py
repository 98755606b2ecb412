"""Sparse position encodings and the entropy bound (METHOD.md §4), on boolean masks.

``bitmap`` (1 bit per position), ``csr`` (column index per non-zero + row pointers), ``relative``
(Deep-Compression gaps of ``r`` bits with filler zeros) and the ``N * H(rho)`` lower bound. Used by
:mod:`prunq.cost.measure`; a lower layer that imports only torch and :mod:`prunq.core.errors`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from prunq.core.errors import PrunqError

#: Position encodings, in tie-break order (the first of equal-cost encodings wins).
ENCODINGS: tuple[str, ...] = ("dense", "bitmap", "csr", "relative")
#: Bits of an unquantized value (weight, activation, bias, other parameter).
FLOAT_BITS = 32
#: Gap widths tried for the relative encoding.
RELATIVE_R_RANGE = range(1, 17)

def entropy_bound_bits(n: int, nz: int) -> float:
    """``n * H(nz / n)`` bits: the entropy floor for the positions of ``nz`` non-zeros among ``n``.

    ``H`` is the binary entropy in bits, 0 at densities 0 and 1.

    >>> entropy_bound_bits(8, 4)
    8.0
    >>> entropy_bound_bits(8, 0), entropy_bound_bits(8, 8)
    (0.0, 0.0)
    """
    if n < 0 or nz < 0 or nz > n:
        raise ValueError(f"need 0 <= nz <= n, got n={n}, nz={nz}")
    if nz == 0 or nz == n:
        return 0.0
    p = nz / n
    return float(n * -(p * math.log2(p) + (1.0 - p) * math.log2(1.0 - p)))


def _ceil_log2(x: int) -> int:
    """Exact ``ceil(log2(x))`` for ``x >= 1`` (integer arithmetic, no float rounding)."""
    return (x - 1).bit_length()


def _gaps(mask: torch.Tensor) -> torch.Tensor:
    """Zeros before each non-zero of the row-major flattened ``mask`` (int64, one entry per non-zero)."""
    flat = torch.as_tensor(mask).reshape(-1)
    if flat.dtype != torch.bool:
        flat = flat != 0
    pos = torch.nonzero(flat).reshape(-1)
    if pos.numel() == 0:
        return pos
    prev = torch.cat([pos.new_full((1,), -1), pos[:-1]])
    return pos - prev - 1


def _relative_from_gaps(gaps: torch.Tensor, r: int, value_bits: int) -> tuple[int, int]:
    # A gap g > M = 2^r - 1 needs floor(g / 2^r) fillers: each filler jumps 2^r positions (a stored gap
    # of M, then the filler's own slot), leaving g mod 2^r <= M for the real entry.
    fillers = int(torch.bitwise_right_shift(gaps, r).sum()) if gaps.numel() else 0
    entries = gaps.numel() + fillers
    return entries * r + fillers * value_bits, fillers


def relative_bits(mask_flat: torch.Tensor, r: int, value_bits: int = FLOAT_BITS) -> tuple[int, int]:
    """``(index_bits, fillers)`` of the relative (Deep Compression) encoding with ``r``-bit gaps.

    The mask is walked in row-major order; every non-zero stores the number of zeros before it in
    ``r`` bits (at most ``M = 2^r - 1``). A gap ``g > M`` is bridged by ``floor(g / 2^r)`` filler
    entries, each a stored zero value that occupies one position. ``index_bits`` counts ``r`` bits per
    entry (non-zeros and fillers) **plus** ``value_bits`` per filler, so that the value term of the layer
    stays ``nz * b_w``. Zeros after the last non-zero cost nothing. Vectorised: O(nz) tensor ops.

    >>> m = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)  # gaps 0 and 10
    >>> relative_bits(m, 3, value_bits=32)   # 10 > 7: one filler; 3 entries * 3 bits + 32
    (41, 1)
    >>> relative_bits(m, 4)                  # 10 <= 15: no filler; 2 entries * 4 bits
    (8, 0)
    """
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 62:
        raise ValueError(f"r must be an integer in 1..62, got {r!r}")
    return _relative_from_gaps(_gaps(mask_flat), r, value_bits)


def best_relative(
    mask: torch.Tensor, value_bits: int = FLOAT_BITS, r_range: Iterable[int] = RELATIVE_R_RANGE
) -> tuple[int, int]:
    """``(index_bits, r)`` of the relative encoding with the ``r`` (default 1..16) that costs least.

    Index bits include the filler values (see :func:`relative_bits`), so the minimum is that of the
    layer's whole memory. Ties go to the smallest ``r``. Once ``2^r`` exceeds the largest gap no
    filler is needed and a larger ``r`` can only cost more, so the search stops there.

    >>> best_relative(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]))
    (8, 4)
    """
    gaps = _gaps(mask)
    nz = gaps.numel()
    long_gaps = gaps[gaps >= 2]  # only gaps >= 2 can need a filler (r >= 1): shift a shorter tensor
    max_gap = int(long_gaps.max()) if long_gaps.numel() else 0
    best: tuple[int, int] | None = None
    for r in sorted(r_range):
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 62:
            raise ValueError(f"r must be an integer in 1..62, got {r!r}")
        fillers = int(torch.bitwise_right_shift(long_gaps, r).sum()) if long_gaps.numel() else 0
        bits = (nz + fillers) * r + fillers * value_bits
        if best is None or bits < best[0]:
            best = (bits, r)
        if max_gap < (1 << r):
            break
    if best is None:
        raise ValueError("r_range is empty")
    return best


def _csr_bits(rows: int, cols: int, nz: int) -> int:
    # Column index of ceil(log2 cols) bits per non-zero + (rows + 1) row pointers that count up to nz;
    # each field at least 1 bit wide.
    col_bits = max(1, _ceil_log2(max(cols, 1)))
    ptr_bits = max(1, _ceil_log2(nz + 1))
    return nz * col_bits + (rows + 1) * ptr_bits


def index_bits(mask: torch.Tensor, encoding: str, r: int | None = None, value_bits: int = FLOAT_BITS) -> int:
    """Bits that store the positions of the non-zeros of a canonical boolean ``mask``.

    * ``dense``: 0 (every value is stored, zeros included -- the value term is then ``N * b_w``);
    * ``bitmap``: one bit per position, ``N``;
    * ``csr``: rows are the out channels (``mask.shape[0]``), columns the rest of the canonical shape:
      ``nz * ceil(log2 cols) + (rows + 1) * ceil(log2(nz + 1))``, each field at least 1 bit;
    * ``relative``: :func:`relative_bits` with ``r``, or the best ``r`` of 1..16 when ``r`` is None
      (filler values counted at ``value_bits``).

    >>> m = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    >>> [index_bits(m, e) for e in ENCODINGS]
    [0, 12, 12, 8]
    """
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        mask = mask != 0
    n = mask.numel()
    if encoding == "dense":
        return 0
    if encoding == "bitmap":
        return n
    if encoding == "csr":
        rows = mask.shape[0] if mask.dim() >= 2 else 1
        cols = n // rows if rows else 0
        return _csr_bits(rows, cols, int(mask.sum()))
    if encoding == "relative":
        if r is None:
            return best_relative(mask, value_bits)[0]
        return relative_bits(mask, r, value_bits)[0]
    raise PrunqError(f"encoding: unknown {encoding!r} (choose from {', '.join(ENCODINGS)})")
