"""The run manifest: an ordered log of transforms, replayed through a fixed map of names to functions.

``model.json`` (METHOD.md §5)::

    {"format": 2, "prunq_version": "...",
     "model": {"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {...}}
              | {"origin": "user", "class": "MyNet"},
     "transforms": [{"op": "mask", "layers": [...]}, {"op": "fold_bn", "pairs": [...]},
                    {"op": "quantize", "layers": {...}}, ...]}

:func:`validate` checks a manifest against its schema before anything is built: the top level and the
model entry (pydantic models, unknown keys refused), every built-in op's arguments (:data:`SCHEMAS`),
sizes (:data:`MAX_TRANSFORMS`, :data:`MAX_NAMES`), nesting and numbers (finite, 64-bit), and layer names
(non-empty dotted parts, no dunders). :func:`replay` gives a fresh model the structure the transforms
describe (in order, so an operation that changes tensor shapes runs before the state dict is loaded),
checking first that every layer an entry names exists in the model. Operation names index
:data:`TRANSFORMS`, filled by code (``@register_transform``) — a name read from a file is looked up,
never imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from prunq.core.errors import PrunqError

FORMAT = 2

#: Limits of a manifest (a real run records a handful of transforms and one name per layer).
MAX_BYTES = 64 << 20  # of model.json
MAX_TRANSFORMS = 1_000
MAX_NAMES = 100_000  # layer names over all transforms
MAX_DEPTH = 32  # nesting of lists and mappings
MAX_NAME_LENGTH = 1_000
_MAX_INT = 2**63

#: op name -> ``fn(model, entry) -> model | None`` (None: changed in place).
TRANSFORMS: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module | None]] = {}


# --------------------------------------------------------------------------------------------------
# the schema
# --------------------------------------------------------------------------------------------------


def _short(v: Any, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 1] + "…"


def check_layer_name(v: Any) -> str:
    """A qualified module name as ``named_modules()`` gives it: dotted non-empty parts, none a dunder
    (``__class__``), printable, at most :data:`MAX_NAME_LENGTH` characters. Else ValueError."""
    if not isinstance(v, str):
        raise ValueError(f"expected a layer name, got {type(v).__name__}")
    if not v or len(v) > MAX_NAME_LENGTH or not v.isprintable():
        raise ValueError(f"{_short(v)} is not a layer name")
    for part in v.split("."):
        if not part:
            raise ValueError(f"{_short(v)} is not a layer name (empty part)")
        if part.startswith("__") and part.endswith("__"):
            raise ValueError(f"{_short(v)} is not a layer name (dunder part {_short(part)})")
    return v


def _unique(names: list[str]) -> list[str]:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"layer {_short(n)} is listed twice")
        seen.add(n)
    return names


LayerName = Annotated[str, AfterValidator(check_layer_name)]
LayerList = Annotated[list[LayerName], Field(max_length=MAX_NAMES), AfterValidator(_unique)]


def _not_dunder(v: str) -> str:
    if v.startswith("__") and v.endswith("__"):
        raise ValueError(f"{_short(v)} is not allowed (a dunder name)")
    return v


#: A Python identifier (a model's, a task's, an argument's name), never a dunder.
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,99}$"), AfterValidator(_not_dunder)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Entry(_Strict):
    """Base of an op's argument schema: ``{"op": name, **args}``; :meth:`layer_names` lists the layers
    the entry names (checked to exist in the model before the op runs)."""

    op: str

    def layer_names(self) -> Iterable[str]:  # noqa: D102
        return ()


class LayersEntry(Entry):
    """``mask``, ``decompose_attention``: a list of layer names."""

    layers: LayerList

    def layer_names(self) -> Iterable[str]:  # noqa: D102
        return self.layers


class FoldEntry(Entry):
    """``fold_bn``: ``[conv, batchnorm]`` name pairs."""

    pairs: Annotated[list[Annotated[list[LayerName], Field(min_length=2, max_length=2)]], Field(max_length=MAX_NAMES)]

    def layer_names(self) -> Iterable[str]:  # noqa: D102
        return [n for p in self.pairs for n in p]


class Grid(_Strict):
    """One quantizer's grid as a manifest records it (:meth:`QParams.to_meta` or a quant plan's entry)."""

    bits: Annotated[int, Field(ge=2, le=8)]
    per_channel: bool | None = None
    axis: Annotated[int, Field(ge=0, le=7)] | None = None
    signed: bool = True
    narrow: bool = True
    power_of_two: bool = False
    zero_point: Annotated[int, Field(ge=-256, le=256)] = 0


class LayerQuant(_Strict):
    weight: Grid | None = None
    act: Grid | None = None


class QuantizeEntry(Entry):
    """``quantize``: per layer, its weight and activation grids."""

    layers: Annotated[dict[LayerName, LayerQuant], Field(max_length=MAX_NAMES)]

    def layer_names(self) -> Iterable[str]:  # noqa: D102
        return self.layers


class QuantizeConfigEntry(Entry):
    """``quantize_config`` (format 1): one QuantConfig for the whole model (validated when replayed)."""

    config: dict[Identifier, Any]


class Converted(_Strict):
    bits: Annotated[int, Field(ge=2, le=8)]
    steps: Annotated[int, Field(ge=1, le=2**31)]


class ConvertEntry(Entry):
    """``convert``: the layers baked by ``convert()``, with their bits and number of steps."""

    layers: Annotated[dict[LayerName, Converted], Field(max_length=MAX_NAMES)]

    def layer_names(self) -> Iterable[str]:  # noqa: D102
        return self.layers


Indices = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1, max_length=1 << 24)]


class Kept(_Strict):
    """The original indices a sliced module keeps: ``out`` / ``in`` channels of a layer, a BatchNorm's
    ``channels``, or an attention module's ``heads``."""

    out: Indices | None = None
    in_: Indices | None = Field(None, alias="in")
    channels: Indices | None = None
    heads: Indices | None = None


class RemoveEntry(Entry):
    """``remove_channels``: per sliced module the channels it keeps; the layers that gained a bias (a
    constant input channel folded into it)."""

    modules: Annotated[dict[LayerName, Kept], Field(max_length=MAX_NAMES)]
    bias: Annotated[list[LayerName], Field(max_length=MAX_NAMES)] = []

    def layer_names(self) -> Iterable[str]:  # noqa: D102
        return [*self.modules, *self.bias]


#: op name -> the schema of its entries. The built-in ops are the file format's and are listed here
#: (so a manifest is checked before any method module is imported); a plug-in passes ``schema=`` to
#: :func:`register_transform` (without one, its entries get only the generic checks).
SCHEMAS: dict[str, type[Entry]] = {
    "mask": LayersEntry,
    "decompose_attention": LayersEntry,
    "fold_bn": FoldEntry,
    "quantize": QuantizeEntry,
    "quantize_config": QuantizeConfigEntry,
    "convert": ConvertEntry,
    "remove_channels": RemoveEntry,
}


class ZooModel(_Strict):
    origin: Literal["zoo"] = "zoo"
    task: Identifier
    name: Identifier
    kwargs: Annotated[dict[Identifier, Any], Field(max_length=100)] = {}


class UserModel(_Strict):
    origin: Literal["user"] = "user"
    class_: Annotated[str, Field(max_length=200)] | None = Field(None, alias="class")


class Manifest(_Strict):
    format: Literal[2]
    prunq_version: Annotated[str, Field(max_length=100)] | None = None
    model: dict[str, Any] | None = None
    transforms: Annotated[list[Any], Field(max_length=MAX_TRANSFORMS)]


_FRIENDLY = {
    "dict_type": "expected a mapping",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "bool_type": "expected true or false",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif out and not str(part).replace("_", "").isalnum():
            out += f"[{_short(str(part), 40)}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _format(e: ValidationError, where: str) -> str:
    """One line naming the first few bad fields: ``transforms[0] (mask).layers[1]: '' is not a layer name``."""
    parts = []
    errors = e.errors(include_url=False)
    for err in errors[:3]:
        loc = _where(tuple(err["loc"]))
        loc = f"{where}.{loc}" if where and loc and not loc.startswith("[") else f"{where}{loc}"
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "missing"
        elif kind in _FRIENDLY:
            msg = f"{_FRIENDLY[kind]}, got {type(err.get('input')).__name__}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if kind not in ("missing", "value_error") and "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f", got {_short(err['input'], 40)}"
        parts.append(f"{loc or '(top level)'}: {msg}")
    if len(errors) > 3:
        parts.append(f"(+{len(errors) - 3} more)")
    return "; ".join(parts).replace("\n", " ")


def check_json(value: Any, source: str) -> None:
    """Generic limits on decoded JSON: nesting (:data:`MAX_DEPTH`), finite numbers within 64 bits,
    string keys. A violation is a one-line PrunqError naming ``source`` and the place."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, where, depth = stack.pop()
        where = where if len(where) <= 120 else where[:119] + "…"
        if isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                raise PrunqError(f"{source}: {where or '(top level)'}: {v} is not a finite number")
            continue
        if isinstance(v, int):
            if not -_MAX_INT <= v < _MAX_INT:
                raise PrunqError(f"{source}: {where or '(top level)'}: integer out of the 64-bit range")
            continue
        if depth >= MAX_DEPTH:
            raise PrunqError(f"{source}: {where or '(top level)'}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise PrunqError(f"{source}: {where or '(top level)'}: key {_short(k)} is not a string")
                stack.append((x, f"{where}.{k}" if where else k, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v))
        else:
            raise PrunqError(f"{source}: {where or '(top level)'}: unexpected {type(v).__name__}")


def check_model_spec(model: Any, source: str = "model.json") -> dict[str, Any]:
    """The manifest's ``model`` entry: ``{"origin": "zoo", "task", "name", "kwargs"}`` or
    ``{"origin": "user", "class"}`` (absent or empty: a user model). Returns it unchanged."""
    if model is None:
        return {}
    if not isinstance(model, dict):
        raise PrunqError(f"{source}: model: expected a mapping, got {type(model).__name__}")
    if not model:
        return model
    origin = model.get("origin", "zoo" if "name" in model else "user")
    schema = {"zoo": ZooModel, "user": UserModel}.get(origin) if isinstance(origin, str) else None
    if schema is None:
        raise PrunqError(f"{source}: model.origin: expected 'zoo' or 'user', got {_short(origin)}")
    try:
        schema.model_validate(model)
    except ValidationError as e:
        raise PrunqError(f"{source}: {_format(e, 'model')}") from None
    return model


def check_entry(entry: Any, i: int, source: str = "model.json") -> Entry | None:
    """One transform entry: a mapping with a known ``op`` whose arguments fit the op's schema. Returns
    the parsed entry (None for a plug-in op without a schema)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("op"), str):
        raise PrunqError(f"{source}: transforms[{i}]: expected a mapping with an 'op' name")
    op = entry["op"]
    if op not in TRANSFORMS and op not in SCHEMAS:
        raise PrunqError(f"{source}: transforms[{i}]: unknown op {_short(op)} (known: {', '.join(sorted(TRANSFORMS))})")
    schema = SCHEMAS.get(op)
    if schema is None:
        return None
    try:
        return schema.model_validate(entry)
    except ValidationError as e:
        raise PrunqError(f"{source}: {_format(e, f'transforms[{i}] ({op})')}") from None


def validate(manifest: dict[str, Any], source: str = "model.json") -> dict[str, Any]:
    """Check a format-2 manifest against the schema (see the module docstring); returns it unchanged."""
    check_json(manifest, source)
    try:
        Manifest.model_validate(manifest)
    except ValidationError as e:
        raise PrunqError(f"{source}: {_format(e, '')}") from None
    check_model_spec(manifest.get("model"), source)
    names = 0
    for i, entry in enumerate(manifest["transforms"]):
        parsed = check_entry(entry, i, source)
        if parsed is not None:
            names += len(list(parsed.layer_names()))
            if names > MAX_NAMES:
                raise PrunqError(f"{source}: transforms: more than {MAX_NAMES:,} layer names in all")
    return manifest


# --------------------------------------------------------------------------------------------------
# the replay map
# --------------------------------------------------------------------------------------------------


def register_transform(op: str, schema: type[Entry] | None = None) -> Callable:
    """Decorator: register the replay function of transform ``op`` (and, optionally, the schema of its
    entries: an :class:`Entry` subclass)."""

    def deco(fn: Callable) -> Callable:
        TRANSFORMS[op] = fn
        if schema is not None:
            SCHEMAS[op] = schema
        return fn

    return deco


def replay(model: nn.Module, transforms: list[dict[str, Any]], source: str = "model.json") -> nn.Module:
    """Apply ``transforms`` to ``model`` in order; an unknown op, a bad entry or a layer the model lacks
    is a PrunqError naming the entry."""
    if not isinstance(transforms, list) or len(transforms) > MAX_TRANSFORMS:
        raise PrunqError(f"{source}: transforms: expected a list of at most {MAX_TRANSFORMS:,} entries")
    for i, entry in enumerate(transforms):
        parsed = check_entry(entry, i, source)
        op = entry["op"]
        fn = TRANSFORMS.get(op)
        if fn is None:
            raise PrunqError(f"{source}: transforms[{i}]: unknown op {_short(op)} (known: {', '.join(sorted(TRANSFORMS))})")
        wanted = list(parsed.layer_names()) if parsed is not None else []
        if wanted:
            have = {name for name, _ in model.named_modules(remove_duplicate=False)}
            missing = [n for n in wanted if n not in have]
            if missing:
                more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
                raise PrunqError(
                    f"{source}: transforms[{i}] ({op}): no layer {_short(missing[0])} in the model "
                    f"({type(model).__name__}){more}"
                )
        try:
            out = fn(model, entry)
        except PrunqError as e:
            raise PrunqError(f"{source}: transforms[{i}] ({op}): {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as e:
            raise PrunqError(f"{source}: transforms[{i}] ({op}): malformed entry ({type(e).__name__}: {_short(str(e), 200)})") from None
        if out is not None:
            model = out
    return model


# --------------------------------------------------------------------------------------------------
# format 1
# --------------------------------------------------------------------------------------------------


def upgrade(manifest: dict[str, Any], source: str = "model.json") -> dict[str, Any]:
    """A format-1 manifest (``masked`` / ``folded`` / one ``quant`` config) as a format-2 transform log;
    either format checked against the schema (:func:`validate`; a malformed entry is a one-line
    PrunqError naming it)."""
    if not isinstance(manifest, dict):
        raise PrunqError(f"{source}: expected a JSON object, got {type(manifest).__name__}")
    fmt = manifest.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt not in (1, FORMAT):
        raise PrunqError(f"{source}: unknown manifest format {_short(fmt)} (this prunq reads 1 and {FORMAT})")
    if fmt == FORMAT:
        if not isinstance(manifest.get("transforms"), list):
            raise PrunqError(f"{source}: missing or malformed 'transforms' list")
        return validate(manifest, source)
    check_json(manifest, source)
    for key in ("model", "masked", "folded", "quant"):
        if key not in manifest:
            raise PrunqError(f"{source}: missing key {key!r}")
    unknown = sorted(set(manifest) - {"format", "prunq_version", "model", "masked", "folded", "quant"})
    if unknown:
        raise PrunqError(f"{source}: {_short(unknown[0])}: unknown key")
    if not isinstance(manifest["masked"], list) or not all(isinstance(n, str) for n in manifest["masked"]):
        raise PrunqError(f"{source}: masked: expected a list of layer names")
    folded = manifest["folded"]
    if not isinstance(folded, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in folded
    ):
        raise PrunqError(f"{source}: folded: expected a list of [conv, batchnorm] name pairs")
    if manifest["quant"] is not None and not isinstance(manifest["quant"], dict):
        raise PrunqError(f"{source}: quant: expected a mapping or null")
    check_model_spec(manifest["model"], source)
    transforms: list[dict[str, Any]] = []
    if manifest["masked"]:
        transforms.append({"op": "mask", "layers": list(manifest["masked"])})
    if manifest["folded"]:
        transforms.append({"op": "fold_bn", "pairs": [list(p) for p in manifest["folded"]]})
    if manifest["quant"] is not None:
        transforms.append({"op": "quantize_config", "config": dict(manifest["quant"])})
    model = dict(manifest["model"] or {})
    if model and "origin" not in model:
        model["origin"] = "zoo" if "name" in model else "user"
    version = manifest.get("prunq_version")
    return validate({"format": FORMAT, "prunq_version": version, "model": model, "transforms": transforms}, source)
