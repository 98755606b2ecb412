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
    "compress": "prunq.pipeline.run",
    "CompressResult": "prunq.pipeline.run",
    "train_dense": "prunq.pipeline.run",
    "load": "prunq.pipeline.io",
    "export": "prunq.pipeline.export",
    "sparsify": "prunq.runtime.sparse",
    "desparsify": "prunq.runtime.sparse",
    "remove_channels": "prunq.prune.structured",
    "save": "prunq.pipeline.io",
    "run_methods": "prunq.pipeline.run",
    "MethodConfig": "prunq.core.config",
    "TrainConfig": "prunq.core.config",
    "MethodBase": "prunq.core.method",
    "RunContext": "prunq.core.method",
    "Transform": "prunq.core.method",
    "register_method": "prunq.core.method",
    "register_transform": "prunq.core.manifest",
    "QParams": "prunq.core.qparams",
    "LayerRecord": "prunq.core.records",
    "layer_records": "prunq.core.records",
    "Pruner": "prunq.prune.pruner",
    "PruneConfig": "prunq.prune.pruner",
    "Granularity": "prunq.prune.granularity",
    "Schedule": "prunq.prune.schedules",
    "QuantConfig": "prunq.quant",
    "prepare": "prunq.quant",
    "calibrate": "prunq.quant",
    "convert": "prunq.quant",
    "unprepare": "prunq.quant",
    "measure": "prunq.cost.measure",
    "LayerQuant": "prunq.cost.measure",
    "Recipe": "prunq.pipeline.recipes",
    "load_recipe": "prunq.pipeline.recipes",
    "parse_recipe": "prunq.pipeline.recipes",
    "get_task": "prunq.tasks",
    "Task": "prunq.tasks",
    "PrunqError": "prunq.core.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from prunq.cost.measure import LayerQuant, measure  # noqa: F401
    from prunq.core.errors import PrunqError  # noqa: F401
    from prunq.prune.granularity import Granularity  # noqa: F401
    from prunq.core.config import MethodConfig, TrainConfig  # noqa: F401
    from prunq.core.manifest import register_transform  # noqa: F401
    from prunq.core.method import MethodBase, RunContext, Transform, register_method  # noqa: F401
    from prunq.core.qparams import QParams  # noqa: F401
    from prunq.core.records import LayerRecord, layer_records  # noqa: F401
    from prunq.pipeline.io import load, save  # noqa: F401
    from prunq.pipeline.run import CompressResult, compress, run_methods, train_dense  # noqa: F401
    from prunq.prune.pruner import PruneConfig, Pruner  # noqa: F401
    from prunq.prune.structured import remove_channels  # noqa: F401
    from prunq.runtime.sparse import desparsify, sparsify  # noqa: F401
    from prunq.quant import QuantConfig, calibrate, convert, prepare, unprepare  # noqa: F401
    from prunq.pipeline.recipes import Recipe, load_recipe, parse_recipe  # noqa: F401
    from prunq.prune.schedules import Schedule  # noqa: F401
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
