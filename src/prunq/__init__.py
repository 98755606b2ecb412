"""prunq: joint pruning and quantization of neural networks to extreme sparsity and low bit-width.

The public API, and nothing else. Names are imported lazily so that ``prunq report`` starts without
loading torch.

>>> import prunq                                               # doctest: +SKIP
>>> task = prunq.get_task("digits")                            # doctest: +SKIP
>>> result = prunq.compress(model, task, "recipes/digits.yaml")  # doctest: +SKIP
>>> prunq.load("runs/demo")                                    # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "prunq.pipeline",
    "CompressResult": "prunq.pipeline",
    "train_dense": "prunq.pipeline",
    "load": "prunq.io",
    "Pruner": "prunq.pruner",
    "PruneConfig": "prunq.pruner",
    "Granularity": "prunq.granularity",
    "Schedule": "prunq.schedules",
    "QuantConfig": "prunq.quant",
    "prepare": "prunq.quant",
    "calibrate": "prunq.quant",
    "convert": "prunq.quant",
    "unprepare": "prunq.quant",
    "measure": "prunq.cost",
    "LayerQuant": "prunq.cost",
    "Recipe": "prunq.recipes",
    "load_recipe": "prunq.recipes",
    "parse_recipe": "prunq.recipes",
    "get_task": "prunq.tasks",
    "Task": "prunq.tasks",
    "PrunqError": "prunq.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from prunq.cost import LayerQuant, measure  # noqa: F401
    from prunq.errors import PrunqError  # noqa: F401
    from prunq.granularity import Granularity  # noqa: F401
    from prunq.io import load  # noqa: F401
    from prunq.pipeline import CompressResult, compress, train_dense  # noqa: F401
    from prunq.pruner import PruneConfig, Pruner  # noqa: F401
    from prunq.quant import QuantConfig, calibrate, convert, prepare, unprepare  # noqa: F401
    from prunq.recipes import Recipe, load_recipe, parse_recipe  # noqa: F401
    from prunq.schedules import Schedule  # noqa: F401
    from prunq.tasks import Task, get_task  # noqa: F401


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prunq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
