"""The runnable examples in the stereo modules' docstrings."""

from __future__ import annotations

import doctest

import pytest

from prunq.tasks.stereo import datasets, metrics, surfaces, synthetic


@pytest.mark.parametrize("module", [metrics, surfaces, synthetic, datasets], ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
