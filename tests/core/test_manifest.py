"""The manifest is a transform log replayed through a fixed map: unknown ops and bad entries are one-line
errors, never an import."""

from __future__ import annotations

import pytest
from torch import nn

import prunq.methods  # noqa: F401  (registers the built-in transforms)
from prunq.core.errors import PrunqError
from prunq.core.manifest import TRANSFORMS, replay, upgrade
from prunq.prune.masks import get_mask


def test_replay_applies_transforms_in_order():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    replay(m, [{"op": "mask", "layers": ["1"]}, {"op": "quantize", "layers": {"1": {"weight": {"bits": 2}, "act": None}}}])
    assert get_mask(m[0]) is None and get_mask(m[1]) is not None
    assert [type(p).__name__ for p in m[1].parametrizations["weight"]] == ["Mask", "WeightQuantizer"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"op": "os.system", "cmd": "rm -rf /"}, "unknown op 'os.system'"),
        ({"layers": []}, "expected a mapping with an 'op'"),
        ({"op": "mask", "layers": ["nope"]}, "transforms[0] (mask): malformed entry"),
        ({"op": "mask"}, "malformed entry"),
        ({"op": "quantize", "layers": {"0": {"weight": {"bits": 12}}}}, "transforms[0] (quantize)"),
    ],
)
def test_bad_transforms_are_one_line_errors(entry, message):
    with pytest.raises(PrunqError) as e:
        replay(nn.Sequential(nn.Linear(2, 2)), [entry])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_map_is_fixed_in_code():
    assert {"mask", "fold_bn", "quantize", "convert"} <= set(TRANSFORMS)
    assert all(callable(fn) for fn in TRANSFORMS.values())


def test_format_1_manifests_are_upgraded():
    old = {"format": 1, "model": {"task": "digits", "name": "digits_cnn", "kwargs": {}}, "masked": ["a"],
           "folded": [["a", "b"]], "quant": {"weight_bits": 4}}  # fmt: skip
    new = upgrade(old)
    assert new["model"]["origin"] == "zoo"
    assert [t["op"] for t in new["transforms"]] == ["mask", "fold_bn", "quantize_config"]
    with pytest.raises(PrunqError, match="unknown manifest format 7"):
        upgrade({"format": 7})
    with pytest.raises(PrunqError, match="missing key 'masked'"):
        upgrade({"format": 1, "model": {}})
