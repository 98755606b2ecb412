"""The ``prune`` method (stage 1 of the two-stage pipeline): score, cut on a schedule, fine-tune, freeze.

Records a ``mask`` transform: the masked layers, so ``prunq.load`` attaches (hard) masks before the state
dict, which holds the mask values, is loaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from prunq.core.manifest import register_transform
from prunq.core.method import MethodBase, RunContext, Transform, register_method
from prunq.cost.measure import count_macs
from prunq.prune import masks as M
from prunq.prune.pruner import PruneConfig, Pruner

#: Seed offset of the scoring pass's batches (kept from the two-stage pipeline, so results reproduce).
SCORE_SEED = 7919


@register_method(PruneConfig)
class PruneMethod(MethodBase):
    """Wraps :class:`~prunq.prune.pruner.Pruner` in the method hooks."""

    stage = "prune"
    prunes = True
    config: PruneConfig

    def attach(self, model: nn.Module, ctx: RunContext) -> None:  # noqa: D102
        cfg = self.config
        batch = getattr(ctx.task, "example_batch_size", None)
        macs = count_macs(model, ctx.example_inputs, batch_size=batch) if cfg.cost_exponent > 0 else None
        self.pruner = Pruner(model, cfg, total_steps=cfg.finetune.steps, macs=macs, seed=ctx.seed)
        self.ctx = ctx
        self.model = model
        if self.pruner.criterion.needs_grad and cfg.score_batches > 0:
            # Scores for the first cut come from a dedicated pass over training batches (no update).
            was = model.training
            model.train()
            task = ctx.task
            for batch in task.calibration_batches(cfg.score_batches, ctx.batch_size, seed=ctx.seed + SCORE_SEED):
                model.zero_grad(set_to_none=True)
                task.loss(model, batch).backward()
                self.pruner.accumulate()
            model.zero_grad(set_to_none=True)
            model.train(was)

    def after_backward(self) -> None:  # noqa: D102
        self.pruner.accumulate()

    def after_step(self, t: int) -> dict | None:  # noqa: D102
        # Every cut is logged with its sparsity; the validation metric only every `eval_every` steps.
        cut = self.pruner.step()
        entry: dict[str, Any] = {} if cut is None else {"sparsity": cut}
        ctx = self.ctx
        if ctx.eval_every and ctx.validate is not None and (t + 1) % ctx.eval_every == 0:
            entry.update(val_metric=ctx.validate(self.model), sparsity=self.pruner.sparsity())
        return entry or None

    def finalize(self, model: nn.Module, ctx: RunContext) -> list[Transform]:  # noqa: D102
        if not self.pruner.frozen:  # no fine-tuning budget, or a schedule that ends after it: cut now
            self.pruner.prune(self.config.sparsity)
            self.pruner.freeze()
        return [Transform("mask", {"layers": [name for name, _, _ in M.masked_modules(model)]})]

    def state_dict(self) -> dict[str, Any]:
        """The pruner's schedule position, cut history and score statistics (masks are in the model)."""
        return {"pruner": self.pruner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.pruner.load_state_dict(state["pruner"])

    def sparsity(self) -> float:
        """Sparsity over the prunable weights (what ``metrics["pruned"]["sparsity"]`` reports)."""
        return self.pruner.sparsity()


@register_transform("mask")
def _replay_mask(model: nn.Module, entry: dict[str, Any]) -> None:
    """Attach a hard mask to each layer (the manifest's schema and the names were checked by ``replay``)."""
    from prunq.core.errors import PrunqError
    from prunq.core.layers import is_compressible

    named = dict(model.named_modules(remove_duplicate=False))
    for name in entry["layers"]:
        module = named[name]
        if not is_compressible(module):
            raise PrunqError(f"layer {name!r} ({type(module).__name__}) is not a prunable layer")
        M.attach_mask(module, soft=False)


@register_transform("remove_channels")
def _replay_remove_channels(model: nn.Module, entry: dict[str, Any]) -> None:
    """Slice the recorded modules to the channels they keep (the state dict then fills the values)."""
    from prunq.prune.structured import replay

    replay(model, entry)
