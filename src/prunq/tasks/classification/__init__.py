"""Image classification tasks (digits, CIFAR-10) and their model zoo."""

from __future__ import annotations

from prunq.tasks.classification.cifar import Cifar10Task, load_cifar10
from prunq.tasks.classification.common import ClassificationTask
from prunq.tasks.classification.digits import DigitsTask
from prunq.tasks.classification.models import MODELS, build

__all__ = ["ClassificationTask", "DigitsTask", "Cifar10Task", "load_cifar10", "MODELS", "build"]
