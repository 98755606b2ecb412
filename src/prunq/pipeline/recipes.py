"""YAML recipes, validated by pydantic (unknown keys are errors).

A recipe says which task and model, how to get the dense model (a checkpoint or a short training
run), and how to prune and quantize it. ``Recipe.model_dump()`` is the *resolved* recipe written to
``DIR/recipe.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prunq.core.errors import PrunqError
from prunq.prune.granularity import Granularity
from prunq.prune.importance import CRITERIA


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_bits(v: int, field: str) -> int:
    if not (2 <= v <= 8 or v in (16, 32)):
        raise ValueError(f"{v} is outside 2–8 (16 or 32 = not quantized)")
    return v


class TaskSpec(_Strict):
    """The task and its data."""

    name: str = "digits"
    data_dir: str | None = None
    batch_size: int = Field(64, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(_Strict):
    """A model from the task's zoo, optionally initialised from a safetensors checkpoint."""

    name: str = "digits_cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None


class TrainSpec(_Strict):
    """A fine-tuning (or training) run: optimizer steps, optimizer and learning rate."""

    steps: int = Field(500, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    lr_schedule: Literal["cosine", "constant"] = "cosine"


class DenseSpec(TrainSpec):
    """Training the dense model when no checkpoint is given (skipped when steps = 0)."""

    steps: int = Field(1000, ge=0)


class PruneSpec(_Strict):
    """Stage 1: score, prune and fine-tune (METHOD.md §2)."""

    sparsity: float = 0.9
    criterion: str = "taylor"
    granularity: str = "element"
    allocation: Literal["global", "layer"] = "global"
    mode: Literal["soft", "hard"] = "soft"
    schedule: Literal["one_shot", "iterative", "gradual"] = "gradual"
    begin: float = Field(0.0, ge=0, le=1)
    end: float = Field(0.7, ge=0, le=1)
    iterations: int = Field(5, ge=1)
    frequency: int = Field(10, ge=1)
    initial_sparsity: float = Field(0.0, ge=0, lt=1)
    min_density: float = Field(0.002, ge=0, le=1)
    min_per_channel: int = Field(1, ge=0)
    exclude: list[str] = Field(default_factory=list)
    overrides: dict[str, float] = Field(default_factory=dict)
    ema: float | None = Field(None, gt=0, lt=1)
    regrow: float | None = Field(0.05, ge=0, le=1)
    cost_exponent: float = Field(0.0, ge=0, le=2)
    score_batches: int = Field(8, ge=0)
    finetune: TrainSpec = TrainSpec()

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"{v} is outside [0, 1)")
        return v

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str) -> str:
        if v not in CRITERIA:
            raise ValueError(f"unknown criterion {v!r} (choose from {', '.join(CRITERIA)})")
        return v

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        try:
            return str(Granularity.parse(v))
        except PrunqError as e:
            raise ValueError(str(e).split(": ", 1)[1]) from None

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: dict[str, float]) -> dict[str, float]:
        for pat, s in v.items():
            if not 0 <= s < 1:
                raise ValueError(f"{pat!r}: sparsity {s} is outside [0, 1)")
        return v

    @model_validator(mode="after")
    def _window(self) -> PruneSpec:
        if self.begin > self.end:
            raise ValueError(f"begin ({self.begin}) is after end ({self.end})")
        if CRITERIA[self.criterion].needs_grad and self.score_batches == 0 and self.finetune.steps == 0:
            raise ValueError(
                f"the {self.criterion} criterion needs gradients: set score_batches > 0 or finetune.steps > 0"
            )
        return self


class LayerBits(_Strict):
    """Per-layer bit-width override."""

    weight_bits: int | None = None
    act_bits: int | None = None

    @field_validator("weight_bits", "act_bits")
    @classmethod
    def _bits(cls, v: int | None, info) -> int | None:
        return None if v is None else _check_bits(v, info.field_name)


class QuantSpec(_Strict):
    """Stage 2: fold batch-norm, calibrate, quantization-aware fine-tune (METHOD.md §3)."""

    enabled: bool = True
    weight_bits: int = 4
    act_bits: int = 8
    overrides: dict[str, LayerBits] = Field(default_factory=dict)
    per_channel: bool = True
    weight_init: Literal["max", "mse"] = "mse"
    act_calibration: Literal["max", "percentile", "mse"] = "percentile"
    percentile: float = Field(99.99, gt=0, le=100)
    learn_step: bool = True
    power_of_two: bool = False
    fold_bn: bool = True
    exclude: list[str] = Field(default_factory=list)
    calib_batches: int = Field(8, ge=1)
    finetune: TrainSpec = TrainSpec(steps=300, lr=2e-4)

    @field_validator("weight_bits", "act_bits")
    @classmethod
    def _bits(cls, v: int, info) -> int:
        return _check_bits(v, info.field_name)


class Recipe(_Strict):
    """A whole compression run."""

    name: str = "run"
    seed: int = 0
    task: TaskSpec = TaskSpec()
    model: ModelSpec = ModelSpec()
    dense: DenseSpec = DenseSpec()
    prune: PruneSpec = PruneSpec()
    quant: QuantSpec = QuantSpec()
    eval_every: int = Field(0, ge=0)

    def with_(self, **changes: Any) -> Recipe:
        """A copy with dotted-path changes, validated: ``r.with_(**{"prune.sparsity": 0.99})``."""
        data = self.model_dump()
        for path, value in changes.items():
            node = data
            *parents, leaf = path.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return parse_recipe(data)


def _format_error(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; errors name the field (``prune.sparsity: …``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PrunqError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise PrunqError(_format_error(e, source)) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file (``yaml.safe_load``)."""
    p = Path(path)
    if not p.is_file():
        raise PrunqError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise PrunqError(f"{p}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    return parse_recipe(data, str(p))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
