"""YAML recipes, validated by pydantic (unknown keys are errors).

A recipe says which task and model, how to get the dense model (a checkpoint or a short training
run), and how to prune and quantize it. ``Recipe.model_dump()`` is the *resolved* recipe written to
``DIR/recipe.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator

import prunq.methods  # noqa: F401  (registers the built-in methods)
from prunq.core.config import Config, MethodConfig, TrainConfig, format_error
from prunq.core.errors import PrunqError
from prunq.core.method import KINDS, config_type
from prunq.prune.pruner import PruneConfig
from prunq.quant.prepare import QuantConfig

#: Shorthand sections: ``prune:`` and ``quant:`` are the first two methods when ``methods:`` is absent.
SHORTHAND = {"prune": "prune", "quant": "quantize"}


class TaskSpec(Config):
    """The task and its data."""

    name: str = "digits"
    data_dir: str | None = None
    batch_size: int = Field(64, ge=1, le=1 << 20, strict=True)  # "64" is an error, not 64
    options: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(Config):
    """A model from the task's zoo, optionally initialised from a safetensors checkpoint."""

    name: str = "digits_cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None


def _default_methods() -> list[MethodConfig]:
    return [PruneConfig(), QuantConfig()]


def _method(item: Any, where: str) -> MethodConfig:
    """One entry of ``methods:`` -> its config, dispatched on ``kind`` through the registry."""
    if isinstance(item, MethodConfig):
        return item
    if not isinstance(item, dict):
        raise PrunqError(f"{where}: expected a mapping with a 'kind', got {type(item).__name__}")
    kind = item.get("kind")
    if not isinstance(kind, str):
        raise PrunqError(f"{where}.kind: missing (choose from {', '.join(sorted(KINDS))})")
    try:
        cls = config_type(kind)
    except PrunqError as e:
        raise PrunqError(f"{where}.kind: {e}") from None
    try:
        return cls.model_validate(item)
    except ValidationError as e:
        raise PrunqError(format_error(e, where, dotted=True)) from None


def method_list(v: Any) -> list[MethodConfig]:
    """Validate ``methods:`` entry by entry. Errors name a method by its kind when it is the only one of
    that kind (``prune.sparsity: ...``), else by position (``methods.2.sparsity: ...``)."""
    if not isinstance(v, list):
        raise PrunqError(f"methods: expected a list of method configs, got {type(v).__name__}")
    kinds = [item.get("kind") if isinstance(item, dict) else getattr(item, "kind", None) for item in v]
    label = {kind: key for key, kind in SHORTHAND.items()}
    out = [
        _method(item, label.get(k, k) if k in KINDS and kinds.count(k) == 1 else f"methods.{i}")
        for i, (item, k) in enumerate(zip(v, kinds))
    ]
    for i, cfg in enumerate(out):
        early = [j for j in range(i) if out[j].kind in cfg.comes_before]
        if early:
            raise PrunqError(
                f"methods.{i}: {cfg.kind} must come before {out[early[0]].kind} (methods.{early[0]}); reorder the list"
            )
    return out


class Recipe(Config):
    """A whole compression run: task, model, dense training, and an ordered list of methods.

    ``methods`` is a discriminated union on ``kind`` over every registered method config (``prune``,
    ``quantize``, and any plug-in). The shorthand ``prune: {...}`` / ``quant: {...}`` (with
    ``quant: {enabled: false}`` to skip quantization) stands for ``methods: [prune, quantize]``; the
    resolved recipe is always written with ``methods``.
    """

    name: str = "run"
    seed: int = Field(0, ge=0, lt=2**63, strict=True)
    task: TaskSpec = TaskSpec()
    model: ModelSpec = ModelSpec()
    dense: TrainConfig = TrainConfig(steps=1000)
    methods: list[SerializeAsAny[MethodConfig]] = Field(default_factory=_default_methods)
    eval_every: int = Field(0, ge=0, strict=True)

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> Any:
        return method_list(v)

    # -- the shorthand sections, read back --------------------------------------------------------
    def method(self, kind: str) -> MethodConfig | None:
        """The first method config of ``kind`` (``"prune"``, ``"quantize"``, ...), or None."""
        return next((m for m in self.methods if m.kind == kind), None)

    @property
    def prune(self) -> PruneConfig | None:
        """The ``prune`` method's config (None when the recipe does not prune)."""
        return self.method("prune")  # type: ignore[return-value]

    @property
    def quant(self) -> QuantConfig | None:
        """The ``quantize`` method's config (None when the recipe does not quantize)."""
        return self.method("quantize")  # type: ignore[return-value]

    @classmethod
    def parse(cls, data: Any, source: str = "recipe") -> Recipe:  # noqa: D102
        return parse_recipe(data, source)

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The recipe's JSON schema, ``methods`` a union discriminated on ``kind`` over every method
        registered now (built-in and plug-ins); the ``prune:``/``quant:`` shorthand is not in it."""
        from typing import Annotated, Union

        from pydantic import create_model

        union = Union[tuple(KINDS.values())]  # noqa: UP007  (a runtime union over the registry)
        fields = {k: (f.annotation, f) for k, f in cls.model_fields.items() if k != "methods"}
        fields["methods"] = (list[Annotated[union, Field(discriminator="kind")]], Field(default_factory=list))
        return create_model("Recipe", __config__=cls.model_config, **fields).model_json_schema()

    def with_(self, **changes: Any) -> Recipe:
        """A copy with dotted-path changes, validated: ``r.with_(**{"prune.sparsity": 0.99})``.

        A path may start with a method's kind (``prune.``, ``quantize.``; ``quant.`` for ``quantize.``) or
        ``methods.<i>.``; ``quant.enabled`` / ``prune.enabled`` (false) drop that method, (true) add it
        with its defaults if absent. A path that matches no field is a KeyError naming it.
        """
        data = self.model_dump()
        for path, value in changes.items():
            head, *rest = path.split(".")
            if head in SHORTHAND and rest == ["enabled"]:
                data["methods"] = _enable(data["methods"], SHORTHAND[head], value, path)
                continue
            if head not in data:
                kind = SHORTHAND.get(head, head)
                idx = next((i for i, m in enumerate(data["methods"]) if m.get("kind") == kind), None)
                if idx is None or not rest:
                    raise KeyError(path)
                node: Any = data["methods"][idx]
            else:
                node = data
                rest = [head, *rest]
            *parents, leaf = rest
            for p in parents:
                if isinstance(node, list):
                    if not p.isdigit() or int(p) >= len(node):
                        raise KeyError(path)
                    node = node[int(p)]
                elif isinstance(node, dict) and p in node:
                    node = node[p]
                else:
                    raise KeyError(path)
            if not isinstance(node, dict):
                raise KeyError(path)
            node[leaf] = value
        return parse_recipe(data)


def _enable(methods: list[dict], kind: str, value: Any, path: str) -> list[dict]:
    if not isinstance(value, bool):
        raise PrunqError(f"{path}: expected true or false")
    present = any(m.get("kind") == kind for m in methods)
    if not value:
        return [m for m in methods if m.get("kind") != kind]
    if present:
        return methods
    new = {"kind": kind}
    # A prune method goes before any method it must precede; anything else at the end.
    if config_type(kind).comes_before:
        idx = next((i for i, m in enumerate(methods) if m.get("kind") in config_type(kind).comes_before), len(methods))
        return [*methods[:idx], new, *methods[idx:]]
    return [*methods, new]


def _expand_shorthand(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``prune:`` / ``quant:`` -> ``methods:`` (errors name the shorthand key, e.g. ``prune.sparsity``)."""
    short = {k: data[k] for k in SHORTHAND if k in data}
    if not short:
        return data
    if "methods" in data:
        raise PrunqError(f"{source}: give either methods: [...] or the prune:/quant: shorthand, not both")
    out = {k: v for k, v in data.items() if k not in SHORTHAND}
    methods = []
    for key, kind in SHORTHAND.items():
        section = short.get(key, {})
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise PrunqError(f"{source}: {key}: expected a mapping, got {type(section).__name__}")
        section = dict(section)
        enabled = section.pop("enabled", True)
        if not isinstance(enabled, bool):
            raise PrunqError(f"{source}: {key}.enabled: expected true or false")
        if not enabled:
            continue
        try:
            methods.append(config_type(kind).model_validate({**section, "kind": kind}))
        except ValidationError as e:
            raise PrunqError(f"{source}: " + format_error(e, key, dotted=True)) from None
    out["methods"] = methods
    return out


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; errors name the field (``prune.sparsity: …``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PrunqError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    data = _expand_shorthand(data, source)
    if "methods" in data:
        try:
            data = {**data, "methods": method_list(data["methods"])}
        except PrunqError as e:
            raise PrunqError(f"{source}: {e}") from None
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise PrunqError(format_error(e, source)) from None
    except PrunqError as e:
        raise PrunqError(f"{source}: {e}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file (``yaml.safe_load``)."""
    p = Path(path)
    if not p.is_file():
        raise PrunqError(f"{p}: recipe file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PrunqError(f"{p}: not UTF-8 text (byte {e.start})") from None
    data = read_yaml(text, str(p))
    if data is None:
        raise PrunqError(f"{p}: the recipe is empty (write at least one section, e.g. task: {{name: digits}})")
    return parse_recipe(data, str(p))


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (a few hundred bytes of anchors expand to gigabytes before
    any check could run) and duplicate keys (YAML keeps the last one silently)."""

    def compose_node(self, parent, index):  # noqa: D102
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a recipe", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: D102
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, source: str) -> Any:
    """Parse YAML with :class:`_StrictLoader`; any error is one line naming ``source``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        where = next((ln.strip() for ln in lines if "line" in ln), "")
        raise PrunqError(f"{source}: not valid YAML ({e.__class__.__name__}: {lines[0][:200]}{'; ' + where if where else ''})") from None
    except RecursionError:
        raise PrunqError(f"{source}: not valid YAML (nested too deeply)") from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
