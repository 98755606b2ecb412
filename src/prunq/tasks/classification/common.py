"""What digits and CIFAR-10 share: in-memory tensors, seeded batching, cross-entropy, top-1.

A :class:`ClassificationTask` holds its train and test splits as CPU tensors. Subclasses store the
images in whatever compact form suits them (float for digits, uint8 for CIFAR) and turn a batch into
network inputs in :meth:`ClassificationTask.prepare` (augmentation + normalisation, on whole batches with
torch ops). Batches move to the model's device inside :meth:`loss` and :meth:`evaluate`, so the
pipeline never has to look inside a batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunq.core.errors import PrunqError
from prunq.tasks.base import Task, inference
from prunq.tasks.classification import models

__all__ = ["ClassificationTask", "random_crop", "random_hflip", "model_device", "mixed_seed"]


def _word(s: int) -> int:
    # One 32-bit word per seed: numpy's SeedSequence splits a larger integer into several words and pads
    # the stream with zeros, so (2**32, 0) would mix like (0, 1). A seed outside [0, 2**32) is hashed to
    # one word instead (seeds inside keep their value, so existing runs reproduce).
    if 0 <= s < 2**32:
        return s
    return int.from_bytes(hashlib.blake2b(s.to_bytes(32, "little", signed=True), digest_size=4).digest(), "little")


def mixed_seed(*seeds: int) -> int:
    """One 63-bit seed from several integers (no collisions in practice, unlike ``a * K + b``)."""
    entropy = [_word(int(s)) for s in seeds]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the original size from ``x`` zero-padded by ``padding`` pixels.

    >>> g = torch.Generator().manual_seed(0)
    >>> random_crop(torch.ones(4, 3, 8, 8), 2, g).shape
    torch.Size([4, 3, 8, 8])
    """
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each sample left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class ClassificationTask(Task):
    """Image classification over in-memory tensors; loss = cross-entropy, metric = top-1 fraction.

    Subclasses call :meth:`__init__` with the splits and may override :meth:`prepare`.
    ``model_names`` lists the zoo entries that fit the task's inputs; ``build_model`` fills in
    ``in_channels`` and ``num_classes``.
    """

    metric_name = "top1"
    higher_is_better = True
    default_model: str = ""
    model_names: tuple[str, ...] = ()
    in_channels: int = 1
    num_classes: int = 10

    @property
    def loss_scale(self) -> float:
        """Cross-entropy of a uniform guess, ln(classes) (the divergence guard's floor)."""
        import math

        return math.log(max(2, self.num_classes))
    eval_batch_size: int = 500

    def __init__(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        seed: int = 0,
    ) -> None:
        if len(x_train) != len(y_train) or len(x_test) != len(y_test):
            raise ValueError("images and labels differ in length")
        self.x_train, self.y_train = x_train, y_train.long()
        self.x_test, self.y_test = x_test, y_test.long()
        self.seed = int(seed)

    # ------------------------------------------------------------------ models
    def build_model(self, name: str | None = None, **kwargs: Any) -> nn.Module:
        """A fresh model from this task's zoo (``default_model`` when ``name`` is None)."""
        name = name or self.default_model
        if name not in self.model_names:
            raise PrunqError(
                f"model.name: unknown model {name!r} for task {self.name!r} "
                f"(choose from {', '.join(self.model_names)})"
            )
        return models.build(name, **self.model_kwargs(name, **kwargs))

    def model_kwargs(self, name: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """``kwargs`` with the data's ``in_channels`` and ``num_classes`` as defaults."""
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, **kwargs}

    # ------------------------------------------------------------------ data
    def prepare(self, x: torch.Tensor, train: bool, generator: torch.Generator | None) -> torch.Tensor:
        """Stored images -> network inputs (float32); ``train`` enables augmentation. Default: as is."""
        return x

    def train_batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(x, y)`` in a seeded random order (the last batch may be smaller).

        The order and any augmentation depend only on ``(task seed, seed)``.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise PrunqError(f"train.batch_size: must be a positive integer, got {batch_size!r}")
        return self._epoch(batch_size, mixed_seed(self.seed, seed))

    def _epoch(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The generator behind :meth:`train_batches` (split off so bad arguments fail at the call)."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.y_train), generator=g)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.prepare(self.x_train[idx], True, g), self.y_train[idx]

    def test_batches(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The test split in order, without augmentation."""
        bs = batch_size or self.eval_batch_size
        for start in range(0, len(self.y_test), bs):
            sl = slice(start, start + bs)
            yield self.prepare(self.x_test[sl], False, None), self.y_test[sl]

    def example_inputs(self) -> tuple[torch.Tensor]:
        """The first test image, shape (1, C, H, W)."""
        return (self.prepare(self.x_test[:1], False, None),)

    # ------------------------------------------------------------------ loss / metric
    def loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of ``model`` on ``batch = (x, y)`` (moved to the model's device)."""
        device = model_device(model)
        x, y = batch[0].to(device), batch[1].to(device)
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """``{"metric": top-1 fraction, "loss": mean cross-entropy, "n": samples}`` on the test split.

        Runs in eval mode under ``no_grad`` and restores every submodule's train/eval flag afterwards.
        """
        return self._score(model, self.test_batches())

    #: Size of the selection sample :meth:`validate` draws from the training split.
    val_fraction: float = 0.2

    def val_indices(self) -> torch.Tensor:
        """The training images :meth:`validate` uses: a fixed, seeded sample of ``val_fraction`` of the
        training split, stratified by nothing (the order is a permutation seeded by the task seed)."""
        g = torch.Generator().manual_seed(mixed_seed(self.seed, 0x5E1EC7))
        n = max(1, int(round(self.val_fraction * len(self.y_train))))
        return torch.randperm(len(self.y_train), generator=g)[:n].sort().values

    def validate(self, model: nn.Module) -> dict[str, Any]:
        """``{"metric": top-1, "loss", "n"}`` on the selection sample of the *training* split (see
        :meth:`val_indices`) — distinct from the test split, so a search never selects on test data.
        It is not held out from training: it measures fit, which is what a selection between pruning
        criteria or budgets during fine-tuning needs without shrinking the bundled training data."""
        idx = self.val_indices()
        return self._score(model, [(self.prepare(self.x_train[idx], False, None), self.y_train[idx])])

    def _score(self, model: nn.Module, batches) -> dict[str, Any]:
        device = model_device(model)
        correct, loss_sum, n = 0, 0.0, 0
        with inference(model):
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                logits = model(x)
                loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
                correct += int((logits.argmax(dim=1) == y).sum())
                n += len(y)
        return {"metric": correct / max(n, 1), "loss": loss_sum / max(n, 1), "n": n}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input={tuple(self.example_inputs()[0].shape[1:])}, seed={self.seed})"
        )
