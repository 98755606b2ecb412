"""Markdown cells and tables (prunq.report.markdown): readable numbers, a dash for anything unusable."""

from __future__ import annotations

from prunq.report.markdown import _DASH, _int, _kib, _ratio, _sci, _sparsity, _table


def test_numbers_by_hand_and_a_dash_for_what_is_not_a_number():
    assert _int(1234567) == "1,234,567"
    assert _kib(8 * 1024 * 3) == "3"  # 3 KiB, in KiB
    assert _sci(95_000_000.0) == "9.50e7"
    assert _ratio(0.0116) == "0.0116" and _sparsity(0.98) == "98.0 %"
    for bad in (None, "12", float("nan"), float("inf"), [1]):
        assert _int(bad) == _DASH and _sci(bad) == _DASH and _ratio(bad) == _DASH and _sparsity(bad) == _DASH


def test_table_alignment_row():
    assert _table(["a", "b"], [[1, "x"]], "lr") == "| a | b |\n|:---|---:|\n| 1 | x |"
