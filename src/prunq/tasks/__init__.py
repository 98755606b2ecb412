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

        _check_stereo_options(kwargs)
        return StereoTask(**kwargs)
    raise PrunqError(f"task.name: unknown task {name!r} (choose from {', '.join(TASKS)})")


#: Bounds on the synthetic stereo task's sizes, so that an absurd option fails at once instead of
#: exhausting memory: one scene at most 4096 pixels a side and 2^22 pixels; at most 10^6 training scenes
#: (an epoch's order is a permutation of them); the validation and selection scenes, which are rendered
#: and kept in memory (about 28 bytes a pixel), at most 2^25 pixels each.
STEREO_LIMITS = {"side": 4096, "pixels": 1 << 22, "n_train": 10**6, "kept_pixels": 1 << 25}


def _check_stereo_options(options: dict) -> None:
    """Refuse stereo ``task.options`` that would allocate without bound (types are the task's to check)."""

    def num(key: str, default: int) -> int | None:
        v = options.get(key, default)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    lim = STEREO_LIMITS
    h, w = num("height", 128), num("width", 256)
    for key, v in (("height", h), ("width", w)):
        if v is not None and v > lim["side"]:
            raise PrunqError(f"task.options.{key}: {v} pixels, over the limit of {lim['side']}")
    if h is not None and w is not None and h * w > lim["pixels"]:
        raise PrunqError(f"task.options.height, width: {h} x {w} pixels, over the limit of {lim['pixels']:,} a scene")
    n_train = num("n_train", 2000)
    if n_train is not None and n_train > lim["n_train"]:
        raise PrunqError(f"task.options.n_train: {n_train:,} scenes, over the limit of {lim['n_train']:,}")
    n_val = num("n_val", 32)
    if n_val is not None and h is not None and w is not None and n_val * h * w > lim["kept_pixels"]:
        raise PrunqError(
            f"task.options.n_val: {n_val:,} scenes of {h} x {w} pixels are kept in memory, over the limit of "
            f"{lim['kept_pixels']:,} pixels"
        )


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
