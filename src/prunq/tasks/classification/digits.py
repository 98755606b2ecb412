"""Handwritten digits (8x8, bundled with scikit-learn), exactly the METHOD.md §6 protocol.

>>> task = DigitsTask()
>>> len(task.y_train), len(task.y_test)
(1437, 360)
"""

from __future__ import annotations

import numpy as np
import torch

from prunq.tasks.classification.common import ClassificationTask, random_crop

__all__ = ["DigitsTask", "load_digits_split"]


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: ``images / 16`` as float32 (N, 1, 8, 8), int64 labels,
    split by ``train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return (
        torch.from_numpy(np.ascontiguousarray(x_tr)),
        torch.from_numpy(y_tr),
        torch.from_numpy(np.ascontiguousarray(x_te)),
        torch.from_numpy(y_te),
    )


class DigitsTask(ClassificationTask):
    """The scikit-learn digits: 1,437 train / 360 test images of 1x8x8 in [0, 1], metric top-1.

    ``seed`` is mixed with the per-epoch seed of :meth:`train_batches`; ``augment=True`` (off by
    default, so the protocol is plain) shifts each training image by up to one pixel.
    Models: ``digits_cnn`` (default) or a CIFAR ResNet with one input channel.
    """

    name = "digits"
    default_model = "digits_cnn"
    model_names = ("digits_cnn", "resnet20", "resnet32", "resnet56")
    in_channels = 1
    num_classes = 10
    eval_batch_size = 512  # the whole test split in one batch

    def __init__(self, seed: int = 0, augment: bool = False) -> None:
        super().__init__(*load_digits_split(), seed=seed)
        self.augment = bool(augment)

    def prepare(self, x: torch.Tensor, train: bool, generator: torch.Generator | None) -> torch.Tensor:
        """Identity, or a random +-1 pixel shift for training batches when ``augment`` is on."""
        if train and self.augment and generator is not None:
            return random_crop(x, 1, generator)
        return x
