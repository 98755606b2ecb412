"""The stereo task (METHOD §6): train on seeded synthetic scenes, report EPE on a synthetic validation split
and on the Middlebury *motorcycle* pair at full size.

Batches are ``(left, right, disp)``: (B, 3, H, W), (B, 3, H, W), (B, H, W) float32, rendered on the fly
(``+inf`` disparity marks a pixel without ground truth). They move to the model's device inside
:meth:`StereoTask.loss` and :meth:`StereoTask.evaluate`.

>>> task = StereoTask(height=32, width=64, max_disp=16, n_train=4, n_val=1, eval_middlebury=False)
>>> left, right, disp = next(iter(task.train_batches(2, seed=0)))
>>> tuple(left.shape), tuple(disp.shape)
((2, 3, 32, 64), (2, 32, 64))
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunq.core.errors import PrunqError
from prunq.tasks.base import Task, inference
from prunq.tasks.classification.common import mixed_seed, model_device
from prunq.tasks.stereo import models
from prunq.tasks.stereo.datasets import middlebury_motorcycle
from prunq.tasks.stereo.metrics import StereoMeter
from prunq.tasks.stereo.synthetic import SyntheticStereo

__all__ = ["StereoTask"]

_REPORT_KEYS = ("epe", "d1", "bad1", "bad2", "bad3")


@functools.lru_cache(maxsize=1)
def _motorcycle() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Middlebury pair, loaded once per process, as a batch of one: (1, 3, H, W) x 2, (1, H, W)."""
    left, right, disp = middlebury_motorcycle()
    return left[None], right[None], disp[None]


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunqError(f"{what}: must be a positive integer, got {value!r}")
    return value


class StereoTask(Task):
    """Stereo disparity: loss = smooth-L1 over valid pixels, metric = ``epe`` (px, lower is better).

    Training scenes come from ``SyntheticStereo("train", n_train, ...)`` (photometric jitter when
    ``jitter``); :meth:`evaluate` uses ``n_val`` un-jittered ``"val"`` scenes (rendered once and kept) and,
    when ``eval_middlebury``, the motorcycle pair at its full 500 x 741 size. With ``cache`` (default)
    rendered training scenes are kept in memory (``n_train`` x ~0.9 MB at 128 x 256).
    """

    name = "stereo"
    metric_name = "epe"
    higher_is_better = False
    default_model = "stereo_net"
    model_names = tuple(models.MODELS)
    eval_batch_size = 8

    def __init__(
        self,
        height: int = 128,
        width: int = 256,
        max_disp: int = 64,
        n_train: int = 2000,
        n_val: int = 32,
        seed: int = 0,
        jitter: bool = True,
        eval_middlebury: bool = True,
        cache: bool = True,
    ) -> None:
        _positive_int(height, "task.height")
        _positive_int(width, "task.width")
        _positive_int(max_disp, "task.max_disp")
        _positive_int(n_train, "task.n_train")
        _positive_int(n_val, "task.n_val")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise PrunqError(f"task.seed: must be a non-negative integer, got {seed!r}")
        self.height, self.width, self.max_disp = height, width, max_disp
        self.seed, self.jitter, self.eval_middlebury = seed, bool(jitter), bool(eval_middlebury)
        # Scene i is a pure function of (seed, split, i), so keeping rendered scenes changes no value; it
        # makes every epoch after the first free of rendering (~18 ms a 128 x 256 scene, ~0.9 MB kept).
        self.cache = bool(cache)
        self._train_cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # SyntheticStereo checks sizes vs. max_disp (max_disp < width / 2) and raises PrunqError.
        self.train_data = SyntheticStereo(
            "train", n_train, height, width, float(max_disp), seed=seed, jitter=self.jitter
        )
        self.val_data = SyntheticStereo("val", n_val, height, width, float(max_disp), seed=seed, jitter=False)
        self._val_cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        # Selection scenes for validate(): the synthetic "test" split, never the val scenes that are the
        # headline metric, so a search cannot select on what is reported.
        self.select_data = SyntheticStereo("test", n_val, height, width, float(max_disp), seed=seed, jitter=False)
        self._select_cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    # ------------------------------------------------------------------ models
    def build_model(self, name: str | None = None, **kwargs: Any) -> nn.Module:
        """A fresh model from the stereo zoo (``stereo_net`` by default); ``max_disp`` defaults to the task's."""
        name = name or self.default_model
        if name not in self.model_names:
            raise PrunqError(
                f"model.name: unknown model {name!r} for task {self.name!r} (choose from {', '.join(self.model_names)})"
            )
        return models.build(name, **self.model_kwargs(name, **kwargs))

    def model_kwargs(self, name: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """``kwargs`` with the task's ``max_disp`` as default."""
        return {"max_disp": self.max_disp, **kwargs}

    # ------------------------------------------------------------------ data
    @property
    def loss_scale(self) -> float:
        """Smooth-L1 of a constant guess halfway up the disparity range, about max_disp / 4 px (the
        divergence guard's floor)."""
        return self.max_disp / 4

    def check_batch(self, batch) -> None:
        """Images finite; disparity without NaN (inf marks pixels without ground truth)."""
        names = ("left image", "right image")
        for name, t in zip(names, batch[:2]):
            if not bool(torch.isfinite(t).all()):
                raise PrunqError(f"the {name} holds NaN or inf (the data, not the learning rate)")
        if len(batch) > 2 and bool(torch.isnan(batch[2]).any()):
            raise PrunqError("the disparity holds NaN (inf marks missing ground truth; NaN is not allowed)")

    def train_batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One epoch (``n_train`` scenes) of ``(left, right, disp)`` in a seeded order; the last batch may
        be smaller. Depends only on ``(task seed, seed)``."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise PrunqError(f"train.batch_size: must be a positive integer, got {batch_size!r}")
        return self._epoch(batch_size, mixed_seed(self.seed, seed))

    def _epoch(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(seed)).tolist()
        for start in range(0, len(order), batch_size):
            yield _stack([self._train_item(i) for i in order[start : start + batch_size]])

    def _train_item(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        item = self._train_cache.get(i)
        if item is None:
            item = self.train_data[i]
            if self.cache:
                self._train_cache[i] = item
        return item

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The validation scenes in order, in batches of ``eval_batch_size`` (rendered once, then cached)."""
        if self._val_cache is None:
            scenes = [self.val_data[i] for i in range(len(self.val_data))]
            self._val_cache = [
                _stack(scenes[s : s + self.eval_batch_size]) for s in range(0, len(scenes), self.eval_batch_size)
            ]
        return iter(self._val_cache)

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first validation pair, (1, 3, height, width) each."""
        left, right, _ = next(self.val_batches())
        return left[:1], right[:1]

    # ------------------------------------------------------------------ loss / metric
    def valid_mask(self, disp: torch.Tensor) -> torch.Tensor:
        """Pixels that train the model: finite ground truth in (0, max_disp)."""
        return torch.isfinite(disp) & (disp > 0) & (disp < self.max_disp)

    def loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """Smooth-L1 (beta 1 px) between ``model(left, right)`` and the ground truth over valid pixels
        (0, still differentiable, when a batch has none)."""
        device = model_device(model)
        left, right, disp = (t.to(device) for t in batch[:3])
        pred = model(left, right)
        mask = self.valid_mask(disp)
        if not bool(mask.any()):
            return pred.sum() * 0.0
        return F.smooth_l1_loss(pred[mask], disp[mask], beta=1.0)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """``{"metric": val epe, "val": {epe, d1, bad1, bad2, bad3}, "middlebury": {...}}`` (the last only
        with ``eval_middlebury``), in eval mode under ``no_grad``; every submodule's train/eval flag is
        restored afterwards. Pixels without ground truth (``inf``) are skipped by the metrics."""
        device = model_device(model)
        with inference(model):
            meter = StereoMeter()
            for left, right, disp in self.val_batches():
                meter.update(model(left.to(device), right.to(device)).float().cpu(), disp)
            val = _report(meter.compute())
            out: dict[str, Any] = {"metric": val["epe"], "val": val}
            if self.eval_middlebury:
                left, right, disp = _motorcycle()
                meter = StereoMeter()
                meter.update(model(left.to(device), right.to(device)).float().cpu(), disp)
                out["middlebury"] = _report(meter.compute())
        return out

    def validate(self, model: nn.Module) -> dict[str, Any]:
        """``{"metric": epe, "select": {epe, d1, bad1, bad2, bad3}}`` on the selection scenes (the synthetic
        "test" split: distinct from the val scenes that give the headline metric, and from Middlebury)."""
        if self._select_cache is None:
            scenes = [self.select_data[i] for i in range(len(self.select_data))]
            bs = self.eval_batch_size
            self._select_cache = [_stack(scenes[s : s + bs]) for s in range(0, len(scenes), bs)]
        device = model_device(model)
        with inference(model):
            meter = StereoMeter()
            for left, right, disp in self._select_cache:
                meter.update(model(left.to(device), right.to(device)).float().cpu(), disp)
        sel = _report(meter.compute())
        return {"metric": sel["epe"], "select": sel}

    def previews(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{"middlebury": (H, W) float32}``: the model's disparity for the motorcycle pair at full size
        (nothing when ``eval_middlebury`` is off)."""
        if not self.eval_middlebury:
            return {}
        left, right, _ = _motorcycle()
        device = model_device(model)
        with inference(model):
            pred = model(left.to(device), right.to(device))[0].float().cpu()
        return {"middlebury": pred.contiguous()}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.height}x{self.width}, max_disp={self.max_disp}, "
            f"train={len(self.train_data)}, val={len(self.val_data)}, seed={self.seed}, "
            f"jitter={self.jitter}, eval_middlebury={self.eval_middlebury})"
        )


def _stack(items: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    left, right, disp = zip(*items)
    return torch.stack(left), torch.stack(right), torch.stack(disp)


def _report(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[k] for k in _REPORT_KEYS}
