"""``prunq export`` / :func:`prunq.export`: deployable files from a run (METHOD.md §7).

Formats: ``packed`` (:mod:`prunq.export.packed`: the compressed model at the cost model's size, read back by
:func:`prunq.load`). Files are written atomically; what a format cannot express is a one-line
:class:`~prunq.core.errors.PrunqError` and nothing is written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

from prunq.core.errors import PrunqError
from prunq.export import packed as P
from prunq.report.fsutil import atomic_write_bytes

#: format -> file suffix
FORMATS = {"packed": ".packed"}
PACKED_FILE = "model.packed"


def _model_and_manifest(source: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A converted copy of the model and its manifest, from a run directory, a CompressResult, or a
    ``(model, manifest)`` pair."""
    from prunq.pipeline.io import load, read_manifest
    from prunq.quant.prepare import convert

    if isinstance(source, (str, Path)):
        d = Path(source)
        return load(d, convert=True), read_manifest(d)
    if isinstance(source, tuple):
        model, manifest = source
    else:
        model, manifest = source.model, source.manifest
    model = convert(copy.deepcopy(model)).eval()
    return model, json.loads(json.dumps(manifest))


def export_bytes(source: Any, format: str = "packed") -> bytes:  # noqa: A002
    """The bytes of ``source`` (a run directory, a CompressResult, or ``(model, manifest)``) in ``format``."""
    if format not in FORMATS:
        raise PrunqError(f"--format: unknown format {format!r} (choose from {', '.join(FORMATS)})")
    model, manifest = _model_and_manifest(source)
    return P.pack(model, manifest)


def export(source: Any, out: str | Path, format: str = "packed") -> Path:  # noqa: A002
    """Write ``source`` in ``format`` to ``out`` (atomically). Returns ``out``.

    >>> prunq.export("runs/demo", "demo.packed")           # doctest: +SKIP
    >>> prunq.load("demo.packed")                          # doctest: +SKIP
    """
    data = export_bytes(source, format)
    return atomic_write_bytes(Path(out), data)


def load_packed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The converted model a packed file holds (bitwise what ``prunq.load(run, convert=True)`` gives)."""
    import prunq.methods  # noqa: F401  (registers the transforms' replay functions)
    from prunq.core.manifest import replay

    p = Path(path)
    info, data = P.read_meta(str(p))
    origin = info.get("model") or {}
    if model is None:
        from prunq.tasks import build_model

        if not isinstance(origin, dict) or "task" not in origin or "name" not in origin:
            cls = origin.get("class") if isinstance(origin, dict) else None
            what = f"your own model ({cls})" if cls else "your own model"
            raise PrunqError(f"{p}: the file holds {what}; pass a fresh instance: prunq.load(path, model=...)")
        kwargs = origin.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise PrunqError(f"{p}: model.kwargs: expected a mapping")
        try:
            model = build_model(origin["task"], origin["name"], **kwargs)
        except TypeError as e:
            raise PrunqError(f"{p}: model: {e}") from None
    try:
        return P.unpack(model, info, data, str(p), replay)
    except ValueError as e:
        raise PrunqError(f"{p}: damaged packed file ({e})") from None


__all__ = ["export", "export_bytes", "load_packed", "FORMATS", "PACKED_FILE"]
