"""One definition per config: pydantic models that serve the Python API and the YAML schema alike.

Why pydantic models (not dataclasses + a schema mirror): a recipe is untrusted YAML, so every field needs
a validator with a message that names it; pydantic gives that, a JSON schema and a discriminated union
for ``methods: [...]`` from the same class the Python API constructs. Configs are frozen (hashable
values, safe to share) and refuse unknown keys.

Each validation rule lives here once, as an annotated type that every config reuses:

>>> from prunq.core.config import Config, Sparsity, Bits
>>> class C(Config):
...     sparsity: Sparsity = 0.5
...     bits: Bits = 4
>>> C(sparsity=0.9).sparsity
0.9
>>> C.parse({"bits": 12}, "recipe.yaml")
Traceback (most recent call last):
...
prunq.core.errors.PrunqError: recipe.yaml: bits: 12 is outside 2–8 (16 or 32 = not quantized)
"""

from __future__ import annotations

import contextvars
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from prunq.core.errors import PrunqError

#: Bit-widths that are quantized (2–8), and those that mean "left in float" (16, 32).
QUANT_BITS: frozenset[int] = frozenset(range(2, 9))
FLOAT_BITS: frozenset[int] = frozenset({16, 32})


def check_bits(bits: object, field: str = "bits") -> int:
    """Return ``bits`` if it is 2–8, 16 or 32; otherwise raise :class:`PrunqError` naming ``field``.

    The one bit-width rule (recipes, configs, the CLI and the quantizers all call it).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not (bits in QUANT_BITS or bits in FLOAT_BITS):
        raise PrunqError(f"{field}: {bits!r} is outside 2–8 (16 or 32 = not quantized)")
    return bits


def check_sparsity(s: object, field: str = "sparsity") -> float:
    """Return ``s`` as a float if it is in [0, 1); otherwise raise :class:`PrunqError` naming ``field``.

    The one sparsity rule.
    """
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
        raise PrunqError(f"{field}: {s!r} is outside [0, 1)")
    return float(s)


def check_ema(v: object, field: str = "ema") -> float:
    """An exponential-moving-average factor: a number in (0, 1). The one rule (configs and criteria)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
        raise PrunqError(f"{field}: {v!r} is outside (0, 1)")
    return float(v)


def check_percentile(v: object, field: str = "percentile") -> float:
    """A calibration percentile: a number in (0, 100]. The one rule (configs and quantizers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 100.0:
        raise PrunqError(f"{field}: {v!r} is outside (0, 100]")
    return float(v)


def _rule(check: Any) -> Any:
    def run(v: Any) -> Any:
        try:
            return check(v, "")
        except PrunqError as e:
            raise ValueError(str(e).removeprefix(": ")) from None

    return run


def _bits(v: int) -> int:
    try:
        return check_bits(v, "")
    except PrunqError as e:
        raise ValueError(str(e).removeprefix(": ")) from None


def _sparsity(v: float) -> float:
    try:
        return check_sparsity(v, "")
    except PrunqError as e:
        raise ValueError(str(e).removeprefix(": ")) from None


#: A bit-width: 2–8 quantized, 16 or 32 float.
Bits = Annotated[int, Field(strict=True), AfterValidator(_bits)]
#: A sparsity (fraction of weights removed), in [0, 1).
Sparsity = Annotated[float, Field(strict=True), AfterValidator(_sparsity)]
#: An exponential-moving-average factor, in (0, 1).
Ema = Annotated[float, Field(strict=True), AfterValidator(_rule(check_ema))]
#: A calibration percentile, in (0, 100].
Percentile = Annotated[float, Field(strict=True), AfterValidator(_rule(check_percentile))]
#: A fraction of a run's steps, in [0, 1].
Fraction = Annotated[float, Field(ge=0, le=1)]


class Config(BaseModel):
    """Base of every prunq config: frozen, unknown keys refused, errors that name the field."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    #: How errors of keyword construction name a field: ``"<prefix>.<field>: <why>"``.
    error_prefix: ClassVar[str] = ""

    def __init__(self, **data: Any) -> None:
        # Keyword construction from Python raises the same one-line PrunqError a recipe gets. pydantic
        # also calls this for nested configs: only the outermost call converts the error.
        token = _DEPTH.set(_DEPTH.get() + 1)
        try:
            super().__init__(**data)
        except ValidationError as e:
            if _DEPTH.get() > 1:
                raise
            raise PrunqError(format_error(e, self.error_prefix or type(self).__name__, dotted=True)) from None
        finally:
            _DEPTH.reset(token)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        # pydantic calls a custom __init__ from model_validate too: mark the call as a validation, so
        # __init__ lets the ValidationError through to whoever formats it (parse, parse_recipe).
        token = _DEPTH.set(_DEPTH.get() + 1)
        try:
            return super().model_validate(obj, *args, **kwargs)
        finally:
            _DEPTH.reset(token)

    @classmethod
    def parse(cls: type[_C], data: Any, source: str = "config") -> _C:
        """Validate a mapping; a bad field is a :class:`PrunqError` ``"<source>: <field>: <why>"``."""
        if isinstance(data, cls):
            return data
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PrunqError(f"{source}: expected a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise PrunqError(format_error(e, source)) from None

    def replace(self: _C, **changes: Any) -> _C:
        """A validated copy with some fields changed (``model_copy`` skips validation)."""
        return type(self).parse({**self.model_dump(), **changes}, type(self).__name__)


_C = TypeVar("_C", bound=Config)
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("prunq_config_depth", default=0)


def format_error(e: ValidationError, source: str, *, dotted: bool = False) -> str:
    """One line naming every bad field: ``"recipe.yaml: prune.sparsity: 1.5 is outside [0, 1)"``.

    ``dotted=True`` joins ``source`` and the field with a dot (``"quant.weight_bits: ..."``).
    """
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        where = err["loc"] and ".".join(str(x) for x in err["loc"])
        parts.append((f"{source}.{where}" if where else source) + f": {msg}" if dotted else f"{loc}: {msg}")
    return "; ".join(parts) if dotted else f"{source}: " + "; ".join(parts)


class TrainConfig(Config):
    """A fine-tuning (or training) run: optimizer steps, optimizer and learning rate.

    Weight decay never applies to quantizer steps, biases or normalisation parameters.
    """

    steps: int = Field(500, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    lr_schedule: Literal["cosine", "constant"] = "cosine"


class MethodConfig(Config):
    """Base of a method's config (one entry of a recipe's ``methods: [...]``).

    A subclass sets ``kind: Literal["<name>"] = "<name>"`` (the discriminator in YAML) and is registered
    with its method by :func:`prunq.core.method.register_method`. ``finetune`` is the training the
    method runs while attached (``steps: 0`` for a retraining-free method).
    """

    kind: str
    finetune: TrainConfig = TrainConfig(steps=0)
    #: Kinds of method that must not come earlier in a recipe (e.g. a mask must be attached before a
    #: quantizer): checked when the recipe is read, not after minutes of training.
    comes_before: ClassVar[tuple[str, ...]] = ()


__all__ = [
    "Bits", "Config", "Fraction", "MethodConfig", "Sparsity", "TrainConfig", "check_bits", "check_sparsity",
    "format_error", "QUANT_BITS", "FLOAT_BITS",
]  # fmt: skip
