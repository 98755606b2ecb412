"""Tasks: classification (digits, CIFAR-10) and stereo depth estimation."""

from __future__ import annotations

from prunq.core.errors import PrunqError
from prunq.tasks.base import Task

__all__ = ["Task", "get_task", "render_previews", "TASKS"]

TASKS = ("digits", "cifar10", "stereo")


def get_task(name: str, **kwargs) -> Task:
    """Build a task by name (``task.name`` in a recipe)."""
    if name == "digits":
        from prunq.tasks.classification.digits import DigitsTask

        return DigitsTask(**kwargs)
    if name == "cifar10":
        from prunq.tasks.classification.cifar import Cifar10Task

        return Cifar10Task(**kwargs)
    if name == "stereo":
        from prunq.tasks.stereo.task import StereoTask

        return StereoTask(**kwargs)
    raise PrunqError(f"task.name: unknown task {name!r} (choose from {', '.join(TASKS)})")


def build_model(task: str, name: str, **kwargs) -> "torch.nn.Module":  # noqa: F821
    """A fresh model from a task's zoo, without loading the task's data (used by ``prunq.load``)."""
    if task in ("digits", "cifar10"):
        from prunq.tasks.classification.models import build

        return build(name, **kwargs)
    if task == "stereo":
        from prunq.tasks.stereo.models import build as build_stereo

        return build_stereo(name, **kwargs)
    raise PrunqError(f"task.name: unknown task {task!r} (choose from {', '.join(TASKS)})")


def render_previews(task: str, previews: dict, out_dir) -> list[tuple[str, str]]:
    """Draw a run's previews (:meth:`Task.previews` of the dense and compressed models, keyed
    ``"<stage>.<name>"``) into ``out_dir``; returns ``(caption, file name)`` pairs, the main figure first.
    Tasks without pictures return ``[]``."""
    if task == "stereo":
        from prunq.tasks.stereo.viz import render_previews as render_stereo

        return render_stereo(previews, out_dir)
    return []
