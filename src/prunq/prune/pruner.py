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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from prunq.prune import masks as M
from prunq.core.errors import PrunqError
from prunq.prune.granularity import Granularity
from prunq.prune.importance import get_criterion
from prunq.core.layers import canonical_shape, compressible_layers, from_canonical, matches, to_canonical
from prunq.prune.schedules import Schedule

ALLOCATIONS = ("global", "layer")
MODES = ("soft", "hard")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. Fractions ``begin``/``end`` are of the fine-tuning steps.

    ``overrides`` pins layers (fnmatch pattern -> sparsity); ``exclude`` leaves layers dense and out of
    the sparsity count. ``min_density`` and ``min_per_channel`` are the per-tensor floor that stops a
    layer from collapsing.

    ``cost_exponent`` (alpha, global allocation) makes the ranking hardware-aware: a layer's scores are
    multiplied by ``(c_mean / c_layer) ** alpha``, with ``c`` the multiply-accumulates each of its weights
    takes part in (``MAC / N``, e.g. the output positions of a conv) and ``c_mean`` its average over all
    prunable weights. 0 ranks by score alone; 1 ranks by score per MAC saved, so the same sparsity buys
    fewer bit-operations. It needs the layers' MACs (``Pruner(..., macs=count_macs(...))``).
    """

    sparsity: float = 0.9
    criterion: str = "taylor"
    granularity: str = "element"
    allocation: str = "global"
    mode: str = "soft"
    schedule: str = "gradual"
    begin: float = 0.0
    end: float = 0.7
    iterations: int = 5
    frequency: int = 10
    initial_sparsity: float = 0.0
    min_density: float = 0.002
    min_per_channel: int = 1
    exclude: tuple[str, ...] = ()
    overrides: dict[str, float] = field(default_factory=dict)
    ema: float | None = None
    regrow: float | None = 0.05
    cost_exponent: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise PrunqError(f"prune.sparsity: {self.sparsity} is outside [0, 1)")
        if self.allocation not in ALLOCATIONS:
            raise PrunqError(f"prune.allocation: unknown allocation {self.allocation!r} (choose from global, layer)")
        if self.mode not in MODES:
            raise PrunqError(f"prune.mode: unknown mode {self.mode!r} (choose from soft, hard)")
        if not 0.0 <= self.begin <= self.end <= 1.0:
            raise PrunqError(f"prune.begin/end: need 0 <= begin <= end <= 1, got {self.begin}, {self.end}")
        if not 0.0 <= self.min_density <= 1.0:
            raise PrunqError(f"prune.min_density: {self.min_density} is outside [0, 1]")
        if self.min_per_channel < 0:
            raise PrunqError("prune.min_per_channel: must be >= 0")
        if self.regrow is not None and not 0.0 <= self.regrow <= 1.0:
            raise PrunqError(f"prune.regrow: {self.regrow} is outside [0, 1]")
        if not 0.0 <= self.cost_exponent <= 2.0:
            raise PrunqError(f"prune.cost_exponent: {self.cost_exponent} is outside [0, 2]")
        for pat, s in self.overrides.items():
            if not 0.0 <= float(s) < 1.0:
                raise PrunqError(f"prune.overrides[{pat!r}]: sparsity {s} is outside [0, 1)")
        Granularity.parse(self.granularity)
        get_criterion(self.criterion)

    @property
    def gran(self) -> Granularity:  # noqa: D102
        return Granularity.parse(self.granularity)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    canon: tuple[int, ...]
    pin: float | None  # pinned final sparsity, or None (follows the global target)

    @property
    def numel(self) -> int:
        return math.prod(self.canon)


class Pruner:
    """Attach masks to every compressible layer of ``model`` and cut them on a schedule.

    ``total_steps`` is the length of the fine-tuning run in optimizer steps (the schedule's
    ``begin``/``end`` fractions refer to it). ``Pruner.prune(s)`` cuts at once, outside any schedule.
    """

    def __init__(
        self, model: nn.Module, config: PruneConfig, total_steps: int = 0, macs: dict[str, int] | None = None
    ) -> None:
        self.model = model
        self.config = config
        self.gran = config.gran
        self.criterion = get_criterion(config.criterion, ema=config.ema, seed=config.seed)
        self.layers: list[_Layer] = []
        for name, mod in compressible_layers(model, config.exclude):
            pin = None
            for pat, s in config.overrides.items():
                if matches(name, [pat]):
                    pin = float(s)  # later patterns win
            self.layers.append(_Layer(name, mod, canonical_shape(mod), pin))
        if not self.layers:
            raise PrunqError(
                "model: no prunable layer (Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear) left after prune.exclude"
            )
        self._cost_scale = self._cost_scales(macs) if config.cost_exponent > 0 else {}
        soft = config.mode == "soft"
        for layer in self.layers:
            M.attach_mask(layer.module, soft=soft)
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
        self._pin_scale = 1.0

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
            w = M.original(layer.module)
            if w.grad is None:
                continue
            self.criterion.accumulate(
                layer.name, to_canonical(w, layer.module), to_canonical(w.grad, layer.module), self.gran
            )

    def step(self) -> float | None:
        """Advance one optimizer step; cut masks at schedule points. Returns the new sparsity if cut."""
        cut = None
        if not self.frozen and self.t in self._updates:
            target = self.schedule.target(self.t)
            if self.t == self._updates[-1]:
                target = self.config.sparsity
            final = self.config.sparsity
            cut = self.prune(target, pin_scale=target / final if final > 0 else 1.0)
            if self.t == self._updates[-1]:
                self.freeze()
        self.t += 1
        return cut

    def freeze(self) -> None:
        """Freeze the masks: shadows of pruned weights set to zero, hard mode from now on."""
        for layer in self.layers:
            M.zero_pruned_(layer.module)
        M.set_soft(self.model, False)
        self.frozen = True

    # -- cutting ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, sparsity: float, pin_scale: float = 1.0) -> float:
        """Recompute every mask for ``sparsity`` (over the prunable weights); returns the sparsity reached.

        Pinned layers (``overrides``) get their own sparsity times ``pin_scale`` (the schedule's progress
        when called from :meth:`step`, so they ramp up with the rest).
        """
        if not 0.0 <= sparsity < 1.0:
            raise PrunqError(f"prune.sparsity: {sparsity} is outside [0, 1)")
        self._pin_scale = pin_scale
        if self.gran.kind == "n:m":
            new = {layer.name: self.gran.nm_mask(self._scores(layer)) for layer in self.layers}
        else:
            scores = {layer.name: self._scores(layer) for layer in self.layers}
            if self.config.allocation == "global":
                new = self._global(scores, sparsity)
            else:
                new = self._per_layer(scores, sparsity)
        for layer in self.layers:
            mask = from_canonical(self.gran.expand(new[layer.name], layer.canon), layer.module)
            M.set_mask(layer.module, mask)
            if self.config.mode == "hard":
                M.zero_pruned_(layer.module)
        if self.criterion.ema is None:
            self.criterion.reset()
        return self.sparsity()

    def _scores(self, layer: _Layer) -> torch.Tensor:
        w = to_canonical(M.original(layer.module), layer.module).detach()
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
        m = to_canonical(M.get_mask(layer.module).mask, layer.module) != 0
        if self.gran.kind in ("kernel", "channel"):
            return self.gran.reduce_sum(m.float()) > 0
        return m

    def _target_for(self, layer: _Layer, sparsity: float) -> float:
        return sparsity if layer.pin is None else layer.pin * self._pin_scale

    def _floor(self, layer: _Layer, scores: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Groups that must stay: the best ``min_per_channel`` per output channel, then the best
        groups until ``min_density`` of the tensor is kept."""
        forced = torch.zeros_like(scores, dtype=torch.bool)
        flat_s = scores.reshape(scores.shape[0], -1)
        k = min(self.config.min_per_channel, flat_s.shape[1])
        if self.gran.kind == "channel":
            k = 0
            forced.view(-1)[scores.reshape(-1).argmax()] = True  # at least one channel
        if k > 0:
            idx = flat_s.topk(k, dim=1).indices
            forced.view(flat_s.shape).scatter_(1, idx, True)
        need = math.ceil(self.config.min_density * layer.numel)
        have = int(sizes[forced].sum())
        if have < need:
            s = scores.reshape(-1).masked_fill(forced.reshape(-1), float("-inf"))
            order = torch.argsort(s, descending=True, stable=True)
            csum = sizes.reshape(-1)[order].cumsum(0)
            n_more = int(torch.searchsorted(csum, torch.tensor(need - have)).item()) + 1
            forced.view(-1)[order[:n_more]] = True
        return forced

    @staticmethod
    def _take_best(scores: torch.Tensor, sizes: torch.Tensor, budget: int) -> torch.Tensor:
        """Greedy by score: keep groups while their cumulative size fits ``budget`` elements."""
        keep = torch.zeros(scores.numel(), dtype=torch.bool)
        if budget <= 0 or scores.numel() == 0:
            return keep
        order = torch.argsort(scores.reshape(-1), descending=True, stable=True)
        csum = sizes.reshape(-1)[order].cumsum(0)
        keep[order[csum <= budget]] = True
        return keep

    def _per_layer(self, scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
        return {
            layer.name: self._per_layer_one(layer, scores[layer.name], self.gran.group_sizes(layer.canon), sparsity)
            for layer in self.layers
        }

    def _global(self, scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
        total = sum(layer.numel for layer in self.layers)
        budget = round((1.0 - sparsity) * total)
        out: dict[str, torch.Tensor] = {}
        pool_s, pool_z, pool_where = [], [], []
        for layer in self.layers:
            s = scores[layer.name]
            sizes = self.gran.group_sizes(layer.canon)
            if layer.pin is not None:
                keep = self._per_layer_one(layer, s, sizes, sparsity)
                out[layer.name] = keep
                budget -= int(sizes[keep].sum())
                continue
            forced = self._floor(layer, s, sizes)
            out[layer.name] = forced
            budget -= int(sizes[forced].sum())
            pool_s.append(s.masked_fill(forced, float("-inf")).reshape(-1))
            pool_z.append(sizes.reshape(-1))
            pool_where.append(layer.name)
        if budget < 0:
            warnings.warn(
                f"prune: the per-tensor floor and pinned layers keep more than the budget; sparsity will be "
                f"below {sparsity:.4f}",
                stacklevel=2,
            )
        if pool_s:
            keep = self._take_best(torch.cat(pool_s), torch.cat(pool_z), budget)
            offset = 0
            for name, s in zip(pool_where, pool_s):
                n = s.numel()
                out[name] = out[name] | keep[offset : offset + n].reshape(out[name].shape)
                offset += n
        return out

    def _per_layer_one(self, layer: _Layer, s: torch.Tensor, sizes: torch.Tensor, sparsity: float) -> torch.Tensor:
        forced = self._floor(layer, s, sizes)
        budget = round((1.0 - self._target_for(layer, sparsity)) * layer.numel) - int(sizes[forced].sum())
        keep = self._take_best(s.masked_fill(forced, float("-inf")), sizes, budget).reshape(s.shape)
        return keep | forced

    # -- measures and checkpointing --------------------------------------------------------------
    def sparsity(self) -> float:
        """Current sparsity over the prunable weights."""
        total = sum(layer.numel for layer in self.layers)
        kept = sum(float(M.get_mask(layer.module).mask.sum()) for layer in self.layers)
        return 1.0 - kept / total

    def densities(self) -> dict[str, float]:
        """Per-layer density (kept fraction)."""
        return {layer.name: float(M.get_mask(layer.module).mask.mean()) for layer in self.layers}

    def state_dict(self) -> dict:
        """Schedule position and criterion statistics (the masks live in the model's state dict)."""
        return {"t": self.t, "frozen": self.frozen, "criterion": self.criterion.state_dict()}

    def load_state_dict(self, state: dict) -> None:  # noqa: D102
        self.t = int(state["t"])
        self.frozen = bool(state["frozen"])
        self.criterion.load_state_dict(state["criterion"])
        if self.frozen:
            M.set_soft(self.model, False)
