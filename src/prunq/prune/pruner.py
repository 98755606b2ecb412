"""The optimizer-like pruner: score, cut, ``step()``, ``state_dict()``.

Use it inside any training loop::

    pruner = Pruner(model, PruneConfig(sparsity=0.98), total_steps=1000)
    for batch in loader:
        loss = criterion(model(x), y)
        loss.backward()
        pruner.accumulate()       # gradient statistics for Taylor / Fisher scores
        optimizer.step(); optimizer.zero_grad()
        pruner.step()             # cuts masks when the schedule says so
    # after the last pruning step masks are frozen (soft mode: shadows zeroed, hard from then on)

The pruner reads scores from a criterion (:mod:`prunq.prune.importance`), turns them into masks through
its granularity's selection (:func:`prunq.prune.allocate.allocate` for all but N:M) and writes the masks
into the model; it never branches on a granularity's or a criterion's name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar, get_args

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import core_schema
from torch import nn

from prunq.core.config import Ema, Fraction, MethodConfig, Sparsity, TrainConfig, check_sparsity
from prunq.core.errors import PrunqError
from prunq.core.layers import (
    canonical_shape, check_patterns, compressible_layers, from_canonical, is_compressible, matches, to_canonical,
)  # fmt: skip
from prunq.core.sharing import parameter_holders, shared_weight_users, stored_weight
from prunq.prune import masks
from prunq.prune.allocate import ALLOCATIONS, Allocation  # noqa: F401  (re-exported)
from prunq.prune.granularity import Granularity
from prunq.prune.importance import check_criterion, get_criterion, needs_grad
from prunq.prune.schedules import Schedule, check_count, check_initial_sparsity, check_schedule_kind, check_window

#: Fine-tuning modes (METHOD.md §2).
Mode = Literal["soft", "hard"]
MODES: tuple[str, ...] = get_args(Mode)

_K = TypeVar("_K")
_V = TypeVar("_V")


class FrozenMap(Mapping[_K, _V], Generic[_K, _V]):
    """An immutable, hashable, insertion-ordered mapping: a config field that reads like a dict.

    A frozen config must be hashable, so a ``dict`` field will not do. Pydantic validates it from any
    mapping (a YAML mapping included) and dumps it as a plain ``dict``. Order matters (later override
    patterns win), so equality and hash are order-sensitive.

    >>> m = FrozenMap({"conv*": 0.5, "fc": 0.9})
    >>> m["fc"], hash(m) == hash(FrozenMap({"conv*": 0.5, "fc": 0.9}))
    (0.9, True)
    """

    __slots__ = ("_d",)

    def __init__(self, data: Mapping[_K, _V] | None = None) -> None:
        self._d: dict[_K, _V] = dict(data or {})

    def __getitem__(self, key: _K) -> _V:
        return self._d[key]

    def __iter__(self) -> Iterator[_K]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(tuple(self._d.items()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return list(self._d.items()) == list(other.items())

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        key, value = get_args(source) or (Any, Any)
        return core_schema.no_info_after_validator_function(
            cls,
            handler.generate_schema(dict[key, value]),  # type: ignore[valid-type]
            serialization=core_schema.plain_serializer_function_ser_schema(dict),
        )


def _rule(check, *args) -> Any:
    """Run a shared rule (which raises ``PrunqError("prune.<field>: why")``) inside a pydantic validator."""
    try:
        return check(*args)
    except PrunqError as e:
        raise ValueError(str(e).split(": ", 1)[-1]) from None


class PruneConfig(MethodConfig):
    """What to prune and how: the ``prune`` method's config, one definition for the Python API and the
    recipe (``prune:`` or ``methods: [{kind: prune, ...}]``). Fractions ``begin``/``end`` are of the
    fine-tuning steps (``finetune.steps``).

    ``criterion`` is a name (``"taylor"``) or a blend ``{"taylor": 0.7, "magnitude": 0.3}``
    (:class:`~prunq.prune.importance.blend.Blend`). ``overrides`` pins layers (fnmatch pattern ->
    sparsity, later patterns win); ``exclude`` leaves layers dense and out of the sparsity count.
    ``min_density`` and ``min_per_channel`` are the per-tensor floor that stops a layer from collapsing.
    ``score_batches`` training batches score the first cut (the method's dedicated pass).

    N:M granularity fixes the sparsity at ``1 - N/M``: leave ``sparsity`` out (it is set for you) or
    give exactly that; ``overrides`` are refused, the floor is implied (N per block), and the schedule
    only decides when blocks are re-selected.

    ``cost_exponent`` (alpha, global allocation) makes the ranking hardware-aware: a layer's scores are
    multiplied by ``(c_mean / c_layer) ** alpha``, with ``c`` the multiply-accumulates each of its weights
    takes part in (``MAC / N``, e.g. the output positions of a conv) and ``c_mean`` its average over all
    prunable weights. 0 ranks by score alone; 1 ranks by score per MAC saved, so the same sparsity buys
    fewer bit-operations. It needs the layers' MACs (``Pruner(..., macs=count_macs(...))``).

    >>> PruneConfig(granularity="2:4").sparsity
    0.5
    >>> PruneConfig(sparsity=2)
    Traceback (most recent call last):
    ...
    prunq.core.errors.PrunqError: prune.sparsity: 2.0 is outside [0, 1)
    """

    error_prefix: ClassVar[str] = "prune"
    kind: Literal["prune"] = "prune"
    sparsity: Sparsity = 0.9
    criterion: str | FrozenMap[str, float] = "taylor"
    granularity: str = "element"
    allocation: Allocation = "global"
    mode: Mode = "soft"
    schedule: str = "gradual"
    begin: Fraction = 0.0
    end: Fraction = Field(0.7, validate_default=True)
    iterations: int = 5
    frequency: int = 10
    initial_sparsity: Sparsity = 0.0
    min_density: float = Field(0.002, ge=0, le=1)
    min_per_channel: int = Field(1, ge=0)
    exclude: tuple[str, ...] = ()
    overrides: FrozenMap[str, Sparsity] = FrozenMap()
    ema: Ema | None = None
    regrow: float | None = Field(0.05, ge=0, le=1)
    cost_exponent: float = Field(0.0, ge=0, le=2)
    score_batches: int = Field(8, ge=0)
    finetune: TrainConfig = TrainConfig()

    @model_validator(mode="before")
    @classmethod
    def _fixed_sparsity(cls, data: Any) -> Any:
        # A granularity that fixes the sparsity (N:M) sets it when the user did not; an explicit, different
        # value is reported by the granularity validator, which sees both.
        if isinstance(data, Mapping) and "sparsity" not in data and "granularity" in data:
            try:
                fixed = Granularity.parse(data["granularity"]).fixed_sparsity
            except PrunqError:
                return data  # reported by the granularity validator
            if fixed is not None:
                return {**data, "sparsity": fixed}
        return data

    @field_validator("criterion", mode="before")
    @classmethod
    def _criterion(cls, v: Any) -> Any:
        v = check_criterion(v)
        return v if isinstance(v, str) else FrozenMap(v)

    @field_validator("granularity", mode="before")
    @classmethod
    def _granularity(cls, v: Any, info: ValidationInfo) -> str:
        g = _rule(Granularity.parse, v)
        s = info.data.get("sparsity")
        if g.fixed_sparsity is not None and s is not None and not math.isclose(s, g.fixed_sparsity, abs_tol=1e-9):
            raise ValueError(
                f"{g} fixes the sparsity at {g.fixed_sparsity}, but sparsity is {s} (leave sparsity out or set it "
                f"to {g.fixed_sparsity})"
            )
        return str(g)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        return _rule(check_schedule_kind, v)

    @field_validator("end")
    @classmethod
    def _end(cls, v: float, info: ValidationInfo) -> float:
        if "begin" in info.data:
            _rule(check_window, info.data["begin"], v)
        return v

    @field_validator("iterations", "frequency")
    @classmethod
    def _count(cls, v: int, info: ValidationInfo) -> int:
        return _rule(check_count, v, info.field_name)

    @field_validator("initial_sparsity")
    @classmethod
    def _initial(cls, v: float, info: ValidationInfo) -> float:
        if "sparsity" in info.data:
            _rule(check_initial_sparsity, v, info.data["sparsity"])
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: FrozenMap[str, float], info: ValidationInfo) -> FrozenMap[str, float]:
        gran = info.data.get("granularity")
        if v and gran is not None and Granularity.parse(gran).fixed_sparsity is not None:
            raise ValueError(f"{gran} fixes the sparsity of every layer; a layer cannot be pinned")
        return v

    @field_validator("score_batches")
    @classmethod
    def _gradients(cls, v: int, info: ValidationInfo) -> int:
        # ``finetune`` is validated before this field (MethodConfig declares it first).
        crit, finetune = info.data.get("criterion"), info.data.get("finetune")
        if v == 0 and crit is not None and finetune is not None and finetune.steps == 0 and needs_grad(crit):
            what = crit if isinstance(crit, str) else "+".join(crit)
            raise ValueError(f"the {what} criterion needs gradients: set score_batches > 0 or finetune.steps > 0")
        return v

    @model_validator(mode="after")
    def _nm_keys(self) -> PruneConfig:
        # N:M decides every layer's mask by itself: a floor, an allocation or a ramp set by the user would
        # be recorded in the resolved recipe and silently ignored, so they are refused.
        if self.gran.fixed_sparsity is not None:
            fields = type(self).model_fields
            ignored = sorted(
                k for k in self.model_fields_set & {"min_density", "min_per_channel", "allocation", "initial_sparsity"}
                if getattr(self, k) != fields[k].default  # a resolved recipe repeats the defaults: fine
            )
            if ignored:
                raise ValueError(f"{', '.join(ignored)}: do not apply with N:M granularity {self.granularity} (remove them)")
        return self

    #: Methods of these kinds must not run before this one (the mask must come before a quantizer).
    comes_before: ClassVar[tuple[str, ...]] = ("quantize",)

    @property
    def gran(self) -> Granularity:  # noqa: D102
        return Granularity.parse(self.granularity)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    canon: tuple[int, ...]
    pin: float | None  # pinned final sparsity, or None (follows the global target)
    sharers: tuple[tuple[str, nn.Module], ...] = ()  # other modules storing the same weight (tied)

    @property
    def numel(self) -> int:
        return math.prod(self.canon)


class Pruner:
    """Attach masks to every compressible layer of ``model`` and cut them on a schedule.

    ``total_steps`` is the length of the fine-tuning run in optimizer steps (the schedule's
    ``begin``/``end`` fractions refer to it). ``seed`` seeds the ``random`` criterion. ``Pruner.prune(s)``
    cuts at once, outside any schedule.

    A weight shared by several modules (tied embedding and head) is one entry of :attr:`layers`, counted
    once, and every module storing it as ``weight`` gets the *same* :class:`~prunq.prune.masks.Mask`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: PruneConfig,
        total_steps: int = 0,
        macs: dict[str, int] | None = None,
        *,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.config = config
        self.gran = config.gran
        self.seed = seed
        self.criterion = get_criterion(config.criterion, ema=config.ema, seed=seed)
        self.layers = _find_layers(model, config)
        if not self.layers:
            raise PrunqError(
                "model: no prunable layer (Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear) left after prune.exclude"
            )
        self._cost_scale = self._cost_scales(macs) if config.cost_exponent > 0 else {}
        soft = config.mode == "soft"
        for layer in self.layers:
            mask = masks.attach_mask(layer.module, soft=soft)
            for _, user in layer.sharers:
                masks.share_mask(user, mask)
        self.total_steps = int(total_steps)
        begin = int(round(config.begin * self.total_steps))
        end = int(round(config.end * self.total_steps))
        self.schedule = Schedule(
            config.schedule, config.sparsity, begin, end, config.iterations, config.frequency, config.initial_sparsity
        )
        ups = self.schedule.update_steps()
        if soft and ups[-1] != end:
            ups.append(end)  # soft mode: a last re-selection with the shadows' scores, then freeze
        self._updates = ups
        self.t = 0
        self.frozen = False
        self._pin_scale = 1.0  # the pinned layers' ramp factor at the last cut
        self._reached = 0.0  # the highest target cut to so far

    def _cost_scales(self, macs: dict[str, int] | None) -> dict[str, float]:
        """Per-layer score multipliers ``(c_mean / c_layer) ** alpha`` (see :class:`PruneConfig`)."""
        missing = [layer.name for layer in self.layers if not macs or layer.name not in macs]
        if missing:
            raise PrunqError(
                f"prune.cost_exponent: needs the MACs of every prunable layer (missing: {', '.join(missing[:3])}); "
                "pass macs=prunq.cost.measure.count_macs(model, example_inputs)"
            )
        assert macs is not None
        per_weight = {layer.name: macs[layer.name] / layer.numel for layer in self.layers}
        total_macs = sum(macs[layer.name] for layer in self.layers)
        if total_macs == 0:
            return {}
        mean = total_macs / sum(layer.numel for layer in self.layers)
        alpha = self.config.cost_exponent
        return {name: (mean / max(c, 1e-12)) ** alpha for name, c in per_weight.items()}

    # -- training-loop hooks ---------------------------------------------------------------------
    @torch.no_grad()
    def accumulate(self) -> None:
        """Fold the current gradients (of the shadow weights) into the criterion's statistics."""
        if not self.criterion.needs_grad or self.frozen:
            return
        for layer in self.layers:
            w = masks.original(layer.module)
            if w.grad is None:
                continue
            self.criterion.accumulate(
                layer.name, to_canonical(w, layer.module), to_canonical(w.grad, layer.module), self.gran
            )

    def step(self) -> float | None:
        """Advance one optimizer step; cut masks at schedule points. Returns the new sparsity if cut.

        An update step whose target does not exceed what was already cut (the cubic schedule's first
        step at ``initial_sparsity = 0``) neither cuts nor resets the statistics, so a dedicated scoring
        pass before step 0 scores the first real cut. The last update step always cuts, then freezes.
        Once frozen (and in hard mode), pruned shadows are re-zeroed after every optimizer step: an
        optimizer with momentum (Adam) would otherwise move them off zero.
        """
        if self.frozen or self.config.mode == "hard":
            self._zero_pruned()
        cut = None
        if not self.frozen and self.t in self._updates:
            final = self.t == self._updates[-1]
            target = self.config.sparsity if final else self.schedule.target(self.t)
            if final or target > self._reached:
                final_s = self.config.sparsity
                cut = self._cut(target, pin_scale=min(target / final_s, 1.0) if final_s > 0 else 1.0)
            if final:
                self.freeze()
        self.t += 1
        return cut

    def freeze(self) -> None:
        """Freeze the masks: shadows of pruned weights set to zero, hard mode from now on."""
        self._zero_pruned()
        masks.set_soft(self.model, False)
        self.frozen = True

    def _zero_pruned(self) -> None:
        for layer in self.layers:
            masks.zero_pruned_(layer.module)

    # -- cutting ---------------------------------------------------------------------------------
    def prune(self, sparsity: float) -> float:
        """Recompute every mask for ``sparsity`` (over the prunable weights); returns the sparsity reached.

        Pinned layers (``overrides``) get their own sparsity. In hard mode (and once frozen) a pruned
        group never returns: a lower target than already cut is an error. With N:M the sparsity must be
        ``1 - N/M``.
        """
        check_sparsity(sparsity, "prune.sparsity")
        fixed = self.gran.fixed_sparsity
        if fixed is not None and not math.isclose(sparsity, fixed, abs_tol=1e-9):
            raise PrunqError(f"prune.sparsity: granularity {self.gran} fixes the sparsity at {fixed}, got {sparsity}")
        return self._cut(sparsity, pin_scale=1.0)

    @torch.no_grad()
    def _cut(self, sparsity: float, pin_scale: float) -> float:
        locked = self.config.mode == "hard" or self.frozen
        if locked and sparsity < self._reached - 1e-12:
            raise PrunqError(
                f"prune.sparsity: {sparsity} is below the {self._reached} already cut; in hard mode (and once the "
                "masks are frozen) a pruned weight never returns"
            )
        cfg = self.config
        pins = {layer.name: layer.pin * pin_scale for layer in self.layers if layer.pin is not None}
        keep = self.gran.select(
            self.scores(), self.group_sizes(), sparsity, allocation=cfg.allocation, min_density=cfg.min_density,
            min_per_channel=cfg.min_per_channel, pins=pins,
        )  # fmt: skip
        for layer in self.layers:
            k = keep[layer.name]
            if locked:
                k = k & self._group_mask(layer)  # masks only shrink, even where the floor would force a group
            masks.set_mask(layer.module, from_canonical(self.gran.expand(k, layer.canon), layer.module))
            if cfg.mode == "hard":
                masks.zero_pruned_(layer.module)
        if self.criterion.ema is None:
            self.criterion.reset()
        self._reached = max(self._reached, sparsity)
        self._pin_scale = pin_scale
        return self.sparsity()

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        """The group scores the next cut ranks, per layer: the criterion's, times the cost scale, with
        ``-inf`` where a group may not return (hard mode, frozen, or over the soft-mode regrow cap).

        With :meth:`group_sizes` this is everything :func:`~prunq.prune.allocate.allocate` needs, so a
        search can evaluate many allocations without touching the model.
        """
        return {layer.name: self._scores(layer) for layer in self.layers}

    def group_sizes(self) -> dict[str, torch.Tensor]:
        """Weights per group, per layer (the ``sizes`` of :func:`~prunq.prune.allocate.allocate`)."""
        return {layer.name: self.gran.group_sizes(layer.canon) for layer in self.layers}

    def _scores(self, layer: _Layer) -> torch.Tensor:
        w = to_canonical(masks.original(layer.module), layer.module).detach()
        # contiguous: a channels_last weight would give channels_last scores, which cannot be viewed flat
        s = self.criterion.scores(layer.name, w, self.gran).float().contiguous().clone()
        if self.config.allocation == "global" and layer.name in self._cost_scale:
            s.mul_(self._cost_scale[layer.name])  # hardware-aware ranking (cost_exponent > 0)
        gmask = self._group_mask(layer)
        if self.config.mode == "hard" or self.frozen:
            # hard mode: a pruned group never returns, so it cannot compete for the budget
            s[~gmask] = float("-inf")
        elif self.config.regrow is not None and not bool(gmask.all()):
            # soft mode: pruned groups compete with their shadow scores, but at most ``regrow`` x the
            # kept groups may return per cut. Near convergence a kept weight's gradient averages to ~0
            # while a pruned one's does not, so an uncapped first-order ranking would swap most of the
            # network at every cut (measured: digits collapses to chance at 98 %).
            cap = math.ceil(self.config.regrow * int(gmask.sum()))
            pruned = s.masked_fill(gmask, float("-inf")).reshape(-1)
            n_pruned = int((~gmask).sum())
            if cap < n_pruned:
                order = torch.argsort(pruned, descending=True, stable=True)
                s.view(-1)[order[cap:n_pruned]] = float("-inf")
        return s

    def _group_mask(self, layer: _Layer) -> torch.Tensor:
        return self.gran.group_mask(to_canonical(masks.get_mask(layer.module).mask, layer.module))

    # -- measures and checkpointing --------------------------------------------------------------
    def sparsity(self) -> float:
        """Current sparsity over the prunable weights (a shared weight counts once)."""
        total = sum(layer.numel for layer in self.layers)
        kept = sum(float(masks.get_mask(layer.module).mask.sum()) for layer in self.layers)
        return 1.0 - kept / total

    def densities(self) -> dict[str, float]:
        """Per-layer density (kept fraction)."""
        return {layer.name: float(masks.get_mask(layer.module).mask.mean()) for layer in self.layers}

    @property
    def pin_scale(self) -> float:
        """The pinned layers' share of their final sparsity at the last cut (the schedule's progress)."""
        return self._pin_scale

    def state_dict(self) -> dict:
        """Schedule position, what was cut, and criterion statistics (masks live in the model's state dict)."""
        return {
            "t": self.t, "frozen": self.frozen, "pin_scale": self._pin_scale, "reached": self._reached,
            "criterion": self.criterion.state_dict(),
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:  # noqa: D102
        self.t = int(state["t"])
        self.frozen = bool(state["frozen"])
        self._pin_scale = float(state.get("pin_scale", 1.0))
        self._reached = float(state.get("reached", 0.0))
        self.criterion.load_state_dict(state["criterion"])
        if self.frozen:
            masks.set_soft(self.model, False)


# -- which tensors are pruned --------------------------------------------------------------------------
def _find_layers(model: nn.Module, config: PruneConfig) -> list[_Layer]:
    """One :class:`_Layer` per prunable *tensor*: modules sharing a weight are its sharers."""
    check_patterns(model, config.exclude, "prune.exclude")
    check_patterns(model, config.overrides, "prune.overrides")
    shared = shared_weight_users(model)
    holders = parameter_holders(model)
    layers: list[_Layer] = []
    seen: set[int] = set()
    for name, mod in compressible_layers(model, config.exclude):
        w = stored_weight(mod)
        if w is None or id(w) in seen:
            continue
        seen.add(id(w))
        sharers = tuple((n, m) for n, m in shared.get(id(w), []) if m is not mod)
        _check_sharing(model, name, mod, w, sharers, holders.get(id(w), []), config.exclude)
        names = [name, *(n for n, _ in sharers)]
        pin = None
        for pat, s in config.overrides.items():
            if any(matches(n, [pat]) for n in names):
                pin = float(s)  # later patterns win
        layers.append(_Layer(name, mod, canonical_shape(mod), pin, sharers))
    return layers


def _layout(module: nn.Module) -> tuple:
    """How a compressible module reads its weight: the canonical view and the grouping."""
    return canonical_shape(module), int(getattr(module, "groups", 1)), bool(getattr(module, "transposed", False))


def _check_sharing(
    model: nn.Module,
    name: str,
    mod: nn.Module,
    w: nn.Parameter,
    sharers: tuple[tuple[str, nn.Module], ...],
    holders: list[str],
    exclude: tuple[str, ...],
) -> None:
    """A shared weight can be masked once for every user only if each stores it as ``weight`` and reads
    it in the same layout; otherwise refuse, naming both modules."""
    for other, m in sharers:
        if not is_compressible(m):
            continue  # e.g. an Embedding tied to a Linear head: the mask applies element-wise
        if matches(other, exclude):
            raise PrunqError(f"prune.exclude: {name!r} and {other!r} share one weight; exclude both or neither")
        if _layout(m) != _layout(mod):
            raise PrunqError(
                f"prune: {name!r} ({type(mod).__name__}) and {other!r} ({type(m).__name__}) share one weight "
                "but read it in different layouts; one mask cannot prune it for both"
            )
    for held in holders:
        prefix, _, attr = held.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        if attr != "weight" or stored_weight(owner) is not w:
            raise PrunqError(
                f"prune: the weight of {name!r} is also held as {held!r}, not as a module's weight; "
                "a mask cannot reach that user"
            )
