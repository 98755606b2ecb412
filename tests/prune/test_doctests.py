"""The runnable examples in the pruning modules' docstrings."""

from __future__ import annotations

import doctest

import pytest

from prunq.core import sharing
from prunq.prune import allocate, granularity, importance, masks, pruner, schedules
from prunq.prune.importance import blend

MODULES = [allocate, granularity, importance, blend, masks, pruner, schedules, sharing]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.removeprefix("prunq."))
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
