from pathlib import Path

import pytest

from prunq.core.errors import PrunqError
from prunq.pipeline.recipes import Recipe, dump_recipe, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    assert isinstance(load_recipe(path), Recipe)


def test_round_trip_of_resolved_recipe(tmp_path):
    r = parse_recipe({"prune": {"granularity": "2:4"}, "quant": {"weight_bits": 2}})
    assert r.prune.sparsity == 0.5  # N:M fixes the sparsity (1 - n/m)
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
        ({"prune": {"granularity": "2:4", "sparsity": 0.9}}, "2:4 fixes the sparsity at 0.5"),
        ({"prune": {"granularity": "2:4", "overrides": {"fc": 0.5}}}, "prune.overrides"),
        ({"methods": [{"kind": "zz"}]}, "methods.0.kind: unknown method kind 'zz'"),
        ({"methods": [{"sparsity": 0.5}]}, "methods.0.kind: missing"),
        ({"methods": [], "prune": {}}, "either methods"),
        ({"quant": {"enabled": "no"}}, "quant.enabled: expected true or false"),
        ({"seed": 2**64}, "seed"),
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


def test_shorthand_and_methods_are_the_same_recipe():
    short = parse_recipe({"prune": {"sparsity": 0.8}, "quant": {"weight_bits": 2}})
    full = parse_recipe({"methods": [{"kind": "prune", "sparsity": 0.8}, {"kind": "quantize", "weight_bits": 2}]})
    assert short == full
    assert parse_recipe({"quant": {"enabled": False}}).quant is None
    assert [m.kind for m in Recipe().methods] == ["prune", "quantize"]


def test_with_addresses_methods_by_kind_and_position():
    r = Recipe()
    assert r.with_(**{"quant.weight_bits": 2}).quant.weight_bits == 2
    assert r.with_(**{"methods.1.act_bits": 4}).quant.act_bits == 4
    for bad in ("quant.nope.x", "gates.beta", "methods.7.sparsity"):
        with pytest.raises(KeyError):
            r.with_(**{bad: 1})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"methods": [{"kind": "quantize"}, {"kind": "prune"}]}, "methods.1: prune must come before quantize"),
        ({"prune": {"granularity": "2:4", "min_density": 0.5}}, "min_density: do not apply with N:M"),
        ({"prune": {"granularity": "2:4", "allocation": "layer"}}, "allocation: do not apply with N:M"),
        ({"prune": {"sparsity": False}}, "prune.sparsity: Input should be a valid number"),
        ({"prune": {"sparsity": "0.5"}}, "prune.sparsity: Input should be a valid number"),
    ],
)  # fmt: skip
def test_review_findings_are_refused_when_the_recipe_is_read(data, message):
    with pytest.raises(PrunqError, match=message):
        parse_recipe(data)


def test_quant_enabled_through_with_and_the_schema_is_a_discriminated_union():
    r = Recipe()
    assert [m.kind for m in r.with_(**{"quant.enabled": False}).methods] == ["prune"]
    back = r.with_(**{"prune.enabled": False}).with_(**{"prune.enabled": True})
    assert [m.kind for m in back.methods] == ["prune", "quantize"]  # a prune method goes before quantize
    assert Recipe.parse({"prune": {"sparsity": 0.5}}).prune.sparsity == 0.5  # shorthand via Recipe.parse too
    items = Recipe.json_schema()["properties"]["methods"]["items"]
    assert items["discriminator"]["propertyName"] == "kind"
    assert {"prune", "quantize"} <= set(items["discriminator"]["mapping"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the recipe is empty"),
        ("# only a comment\n", "the recipe is empty"),
        ("a: &x [1, 2]\nb: *x\n", "aliases (*name) are not allowed"),
        ("prune: {sparsity: 0.5}\nprune: {sparsity: 0.9}\n", "duplicate key 'prune'"),
        ("prune:\n  finetune: {lr: .inf}\n", "prune.finetune.lr: Input should be a finite number"),
        ("task: {batch_size: 1000000000000}\n", "task.batch_size"),
        ("seed: 100000000000000000000\n", "seed"),
        ("prune: [unclosed\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_hostile_recipe_files_are_one_line_errors(tmp_path, text, message):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(PrunqError) as e:
        load_recipe(p)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_recipe_that_is_not_utf8_is_a_one_line_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"prune: {sparsity: 0.5}\n\xff\xfe")
    with pytest.raises(PrunqError, match="not UTF-8"):
        load_recipe(p)


def test_alias_bomb_is_refused_before_expansion(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    p = tmp_path / "bomb.yaml"
    p.write_text(bomb)
    with pytest.raises(PrunqError) as e:
        load_recipe(p)
    assert len(str(e.value)) < 300
