from pathlib import Path

import pytest

from prunq.core.errors import PrunqError
from prunq.pipeline.recipes import Recipe, dump_recipe, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    assert isinstance(load_recipe(path), Recipe)


def test_round_trip_of_resolved_recipe(tmp_path):
    r = parse_recipe({"prune": {"sparsity": 0.99, "granularity": "2:4"}, "quant": {"weight_bits": 2}})
    p = tmp_path / "r.yaml"
    p.write_text(dump_recipe(r))
    assert load_recipe(p) == r


@pytest.mark.parametrize(
    "data, field",
    [
        ({"prune": {"sparsity": 1.0}}, "prune.sparsity: 1.0 is outside [0, 1)"),
        ({"prune": {"sparsity": -0.1}}, "prune.sparsity"),
        ({"quant": {"weight_bits": 9}}, "quant.weight_bits: 9 is outside 2–8"),
        ({"quant": {"act_bits": 1}}, "quant.act_bits"),
        ({"quant": {"overrides": {"fc": {"weight_bits": 12}}}}, "quant.overrides.fc.weight_bits"),
        ({"prune": {"criterion": "l1"}}, "prune.criterion: unknown criterion 'l1'"),
        ({"prune": {"granularity": "block"}}, "prune.granularity: unknown granularity 'block'"),
        ({"prune": {"granularity": "4:4"}}, "prune.granularity: N:M needs 0 < N < M"),
        ({"prune": {"sparsty": 0.9}}, "prune.sparsty: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"prune": {"begin": 0.8, "end": 0.2}}, "begin"),
        ([1, 2], "must be a YAML mapping"),
        ({"prune": {"score_batches": 0, "finetune": {"steps": 0}}}, "taylor criterion needs gradients"),
    ],
)  # fmt: skip
def test_bad_recipes_name_the_field(data, field):
    with pytest.raises(PrunqError) as e:
        parse_recipe(data)
    assert field in str(e.value)


def test_bits_16_and_32_mean_not_quantized():
    r = parse_recipe({"quant": {"weight_bits": 32, "act_bits": 16}})
    assert (r.quant.weight_bits, r.quant.act_bits) == (32, 16)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(PrunqError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [unclosed")
    with pytest.raises(PrunqError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)


def test_with_changes_are_validated():
    r = Recipe()
    assert r.with_(**{"prune.sparsity": 0.5}).prune.sparsity == 0.5
    with pytest.raises(PrunqError, match="prune.sparsity"):
        r.with_(**{"prune.sparsity": 2})
