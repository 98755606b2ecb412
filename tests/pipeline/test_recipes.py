from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# --------------------------------------------------------------------------------------------------
# property: random recipes. Valid ones validate and round-trip through YAML to an equal Recipe; invalid
# ones are a one-line PrunqError naming the field.
# --------------------------------------------------------------------------------------------------


_BITS = [2, 3, 4, 5, 6, 7, 8, 16, 32]
_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
_FRAC = st.floats(0.0, 1.0, allow_nan=False)

#: field -> values that validate
VALID = {
    "name": _NAMES,
    "seed": st.integers(0, 2**63 - 1),
    "eval_every": st.integers(0, 10**6),
    "task.name": st.sampled_from(["digits", "cifar10", "stereo"]),
    "task.batch_size": st.integers(1, 1 << 20),
    "task.options": st.dictionaries(st.sampled_from(["seed", "augment", "n_val"]), st.integers(0, 100), max_size=2),
    "model.name": st.sampled_from(["digits_cnn", "resnet20", "stereo_net"]),
    "model.kwargs": st.dictionaries(st.sampled_from(["width", "num_classes"]), st.integers(1, 16), max_size=2),
    "dense.steps": st.integers(0, 10**7),
    "dense.lr": st.floats(1e-9, 10.0),
    "dense.optimizer": st.sampled_from(["adam", "adamw", "sgd"]),
    "dense.momentum": st.floats(0.0, 0.999),
    "prune.sparsity": st.floats(0.0, 0.999),
    "prune.frequency": st.integers(1, 1000),
    "prune.begin": st.floats(0.0, 0.5),
    "prune.finetune.steps": st.integers(0, 10**6),
    "quant.weight_bits": st.sampled_from(_BITS),
    "quant.act_bits": st.sampled_from(_BITS),
    "quant.percentile": st.floats(0.01, 100.0),
    "quant.per_channel": st.booleans(),
    "quant.calib_batches": st.integers(1, 1000),
    "methods": st.lists(st.sampled_from([{"kind": "prune", "sparsity": 0.5}, {"kind": "quantize", "act_bits": 16}]),
                        max_size=2, unique_by=lambda m: m["kind"]).map(lambda ms: sorted(ms, key=lambda m: m["kind"])),
}
#: field -> values that do not (wrong type, out of range, not finite, too large)
INVALID = {
    "name": st.sampled_from([5, [], {}]),
    "seed": st.sampled_from([-1, 2**63, 2**64, "x", 1.5, [0]]),
    "eval_every": st.sampled_from([-1, "x", 0.5]),
    "task.name": st.sampled_from([3, ["digits"]]),
    "task.batch_size": st.sampled_from([0, -5, (1 << 20) + 1, 10**12, "64", 6.5]),
    "task.options": st.sampled_from([[], "x", 3]),
    "model.kwargs": st.sampled_from([[], "width=1", 3]),
    "model.nope": st.integers(),
    "dense.steps": st.sampled_from([-1, "x"]),
    "dense.lr": st.sampled_from([0.0, -1.0, float("inf"), float("nan"), "fast"]),
    "dense.optimizer": st.sampled_from(["rmsprop", 3]),
    "dense.momentum": st.sampled_from([1.0, -0.1]),
    "prune.sparsity": st.one_of(st.floats(1.0, 1e300), st.floats(-1e300, -1e-9), st.sampled_from(["x", True, None])),
    "prune.begin": st.sampled_from([-0.5, 1.5, "x"]),
    "prune.nope": st.integers(),
    "quant.weight_bits": st.one_of(st.integers(9, 15), st.integers(-100, 1), st.sampled_from([4.0, "4", True, 64])),
    "quant.act_bits": st.sampled_from([0, 1, 9, 33, "8"]),
    "quant.percentile": st.sampled_from([0.0, 100.5, -1.0, float("nan")]),
    "quant.calib_batches": st.sampled_from([0, -1, "x"]),
    "quant.per_channel": st.sampled_from(["maybe", "yes", 2, None]),  # flags take booleans only
    # (a lone method's bad field is named by its kind, e.g. prune.sparsity: covered by the prune.* keys)
    "methods": st.sampled_from([[{"kind": "zzz"}], [3], "prune", [{"kind": "quantize"}, {"kind": "prune"}]]),
}


def _put(data: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


@st.composite
def _recipes(draw, valid: bool):
    """A recipe dict with a few valid fields and, when ``valid`` is False, one invalid field (returned)."""
    fields = draw(st.lists(st.sampled_from(sorted(VALID)), min_size=1, max_size=6, unique=True))
    bad = None if valid else draw(st.sampled_from(sorted(INVALID)))
    data: dict = {}
    for f in fields:
        if f != bad:
            _put(data, f, draw(VALID[f]))
    if bad is not None:
        _put(data, bad, draw(INVALID[bad]))
    if "methods" in data:  # methods: [...] or the prune:/quant: shorthand, not both
        if bad is not None and bad.split(".")[0] in ("prune", "quant"):
            del data["methods"]
        else:
            data.pop("prune", None), data.pop("quant", None)
    if "prune" in data and "begin" in data["prune"]:
        data["prune"].setdefault("end", 0.9)  # begin must come before end
    return data, bad


_FAST = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip


@_FAST
@given(_recipes(valid=True))
def test_random_valid_recipes_round_trip_through_yaml(tmp_path, case):
    data, _ = case
    r = parse_recipe(data, "r.yaml")
    p = tmp_path / "r.yaml"
    p.write_text(dump_recipe(r))
    assert load_recipe(p) == r
    assert parse_recipe(r.model_dump(mode="json")) == r


@_FAST
@given(_recipes(valid=False))
def test_random_invalid_recipes_are_one_line_errors_naming_the_field(case):
    data, bad = case
    with pytest.raises(PrunqError) as e:
        parse_recipe(data, "r.yaml")
    text = str(e.value)
    assert "\n" not in text and text.startswith("r.yaml: ")
    assert bad in text, (bad, text)
