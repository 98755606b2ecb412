"""Each validation rule once: bits and sparsity, used by every config, the recipe and the CLI."""

from __future__ import annotations

import pytest

from prunq.core.config import TrainConfig, check_bits, check_sparsity
from prunq.core.errors import PrunqError
from prunq.quant import QuantConfig


@pytest.mark.parametrize("bits", [2, 4, 8, 16, 32])
def test_bits_accepted(bits):
    assert check_bits(bits) == bits


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 64, True, 4.0, "4"])
def test_bits_refused(bits):
    with pytest.raises(PrunqError, match="f: .* is outside 2–8"):
        check_bits(bits, "f")


@pytest.mark.parametrize("s, ok", [(0, True), (0.5, True), (0.999, True), (1.0, False), (-0.1, False), (True, False)])
def test_sparsity_rule(s, ok):
    if ok:
        assert check_sparsity(s) == float(s)
    else:
        with pytest.raises(PrunqError, match="is outside \\[0, 1\\)"):
            check_sparsity(s)


def test_keyword_construction_gives_the_same_one_line_error():
    with pytest.raises(PrunqError, match=r"^quant\.weight_bits: 12 is outside 2–8"):
        QuantConfig(weight_bits=12)
    with pytest.raises(PrunqError, match=r"^quant\.overrides\.fc\.act_bits"):
        QuantConfig(overrides={"fc": {"act_bits": 1}})
    with pytest.raises(PrunqError, match="TrainConfig.steps"):
        TrainConfig(steps=-1)


def test_configs_are_frozen_values():
    a, b = QuantConfig(weight_bits=2), QuantConfig(weight_bits=2)
    assert a == b and a.replace(act_bits=4).act_bits == 4 and a.act_bits == 8
    with pytest.raises(Exception):
        a.weight_bits = 3  # type: ignore[misc]
