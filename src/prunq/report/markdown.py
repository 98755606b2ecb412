"""Markdown cells and tables for the reports (:mod:`prunq.report.report`, :mod:`prunq.report.sweep`):
numbers formatted for reading, a dash for a value that is missing or unusable (a report of a damaged or
hostile ``metrics.json`` renders rather than raising). No torch, no matplotlib.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prunq.report.plots import finite

_DASH = "—"

# --------------------------------------------------------------------------------------------------
# number formatting
# --------------------------------------------------------------------------------------------------


def _int(v: Any) -> str:
    """Thousands separators: ``12345 -> '12,345'``."""
    f = finite(v)
    return _DASH if f is None else f"{round(f):,}"


def _sci(v: Any) -> str:
    """Scientific with 3 significant digits, compact exponent: ``1234567 -> '1.23e6'``."""
    f = finite(v)
    if f is None:
        return _DASH
    if f == 0:
        return "0"
    mantissa, exponent = f"{f:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _ratio(v: Any) -> str:
    """3 significant digits: ``0.01234 -> '0.0123'``, ``0.0006 -> '0.0006'``."""
    f = finite(v)
    return _DASH if f is None else f"{f:.3g}"


def _kib(bits: Any) -> str:
    """Bits as KiB, 3 significant digits (whole KiB with separators from 1,000 up)."""
    f = finite(bits)
    if f is None:
        return _DASH
    kib = f / 8192.0
    return f"{kib:,.0f}" if abs(kib) >= 1000 else f"{kib:.3g}"


def _pct3(frac: Any) -> str:
    """A fraction as a percentage with 3 significant digits: ``0.00213 -> '0.213 %'``."""
    f = finite(frac)
    return _DASH if f is None else f"{100.0 * f:.3g} %"


def _sparsity(frac: Any) -> str:
    """Sparsity with one decimal, more when one would round an extreme sparsity up to 100 %.

    >>> _sparsity(0.98), _sparsity(0.9996), _sparsity(1.0), _sparsity(0.0)
    ('98.0 %', '99.96 %', '100.0 %', '0.0 %')
    """
    f = finite(frac)
    if f is None:
        return _DASH
    digits = 1
    while f < 1.0 and round(100.0 * f, digits) >= 100.0 and digits < 6:
        digits += 1
    return f"{100.0 * f:.{digits}f} %"


def _bits(section: Mapping[str, Any]) -> str:
    """``w4a8``; an absent (unquantized) side counts as 32 bits, an unusable one (``"4"``) is a dash."""
    wb, ab = section.get("weight_bits"), section.get("act_bits")
    return f"w{32 if wb is None else _bit_cell(wb)}a{32 if ab is None else _bit_cell(ab)}"


def _bit_cell(v: Any) -> str:
    """One bit-width: an integer, or a dash when absent or not a usable number."""
    f = finite(v)
    return _DASH if f is None or f != int(f) else str(int(f))


def _duration(seconds: Any) -> str:
    f = finite(seconds)
    if f is None:
        return _DASH
    if f < 60:
        return f"{f:.1f} s"
    if f < 3600:
        m, s = divmod(round(f), 60)
        return f"{m} min {s:02d} s"
    h, rem = divmod(round(f), 3600)
    return f"{h} h {rem // 60:02d} min"


def _cell(v: Any) -> str:
    if v is None:
        return _DASH
    return str(v).replace("\n", " ").replace("|", "\\|")


_ALIGN = {"l": ":---", "r": "---:", "c": ":---:"}


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> str:
    """A GitHub-flavoured Markdown table; ``align[i]`` is ``l``, ``r`` (numbers) or ``c`` for column ``i``."""
    assert len(align) == len(headers), (align, headers)
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
             "|" + "|".join(_ALIGN[a] for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _section(metrics: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = metrics.get(key)
    return v if isinstance(v, Mapping) else {}


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []
