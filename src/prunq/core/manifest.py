"""The run manifest: an ordered log of transforms, replayed through a fixed map of names to functions.

``model.json`` (METHOD.md §5)::

    {"format": 2, "prunq_version": "...",
     "model": {"origin": "zoo", "task": "digits", "name": "digits_cnn", "kwargs": {...}}
              | {"origin": "user", "class": "MyNet"},
     "transforms": [{"op": "mask", "layers": [...]}, {"op": "fold_bn", "pairs": [...]},
                    {"op": "quantize", "layers": {...}}, ...]}

:func:`replay` gives a fresh model the structure the transforms describe (in order, so an operation
that changes tensor shapes runs before the state dict is loaded). Operation names index
:data:`TRANSFORMS`, filled by code (``@register_transform``) — a name read from a file is looked up,
never imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from prunq.core.errors import PrunqError

FORMAT = 2

#: op name -> ``fn(model, entry) -> model | None`` (None: changed in place).
TRANSFORMS: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module | None]] = {}


def register_transform(op: str) -> Callable:
    """Decorator: register the replay function of transform ``op``."""

    def deco(fn: Callable) -> Callable:
        TRANSFORMS[op] = fn
        return fn

    return deco


def replay(model: nn.Module, transforms: list[dict[str, Any]], source: str = "model.json") -> nn.Module:
    """Apply ``transforms`` to ``model`` in order; an unknown op or a bad entry is a PrunqError."""
    for i, entry in enumerate(transforms):
        if not isinstance(entry, dict) or not isinstance(entry.get("op"), str):
            raise PrunqError(f"{source}: transforms[{i}]: expected a mapping with an 'op' name")
        fn = TRANSFORMS.get(entry["op"])
        if fn is None:
            raise PrunqError(
                f"{source}: transforms[{i}]: unknown op {entry['op']!r} (known: {', '.join(sorted(TRANSFORMS))})"
            )
        try:
            out = fn(model, entry)
        except PrunqError as e:
            raise PrunqError(f"{source}: transforms[{i}] ({entry['op']}): {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as e:
            raise PrunqError(f"{source}: transforms[{i}] ({entry['op']}): malformed entry ({type(e).__name__}: {e})") from None
        if out is not None:
            model = out
    return model


def _check_model(model: Any, source: str) -> dict[str, Any]:
    """The manifest's ``model`` entry: ``{"origin": "zoo", "task", "name", "kwargs"}`` or ``{"origin": "user"}``."""
    if not isinstance(model, dict):
        raise PrunqError(f"{source}: model: expected a mapping, got {type(model).__name__}")
    if model.get("origin", "zoo" if "name" in model else "user") == "zoo":
        for key in ("task", "name"):
            if not isinstance(model.get(key), str):
                raise PrunqError(f"{source}: model.{key}: expected a name")
        if not isinstance(model.get("kwargs", {}), dict):
            raise PrunqError(f"{source}: model.kwargs: expected a mapping")
    return model


def upgrade(manifest: dict[str, Any], source: str = "model.json") -> dict[str, Any]:
    """A format-1 manifest (``masked`` / ``folded`` / one ``quant`` config) as a format-2 transform log;
    either format's structure checked (a malformed entry is a one-line PrunqError naming it)."""
    fmt = manifest.get("format", 1)
    if isinstance(fmt, bool) or fmt not in (1, FORMAT):
        raise PrunqError(f"{source}: unknown manifest format {fmt!r} (this prunq reads 1 and {FORMAT})")
    if fmt == FORMAT:
        if not isinstance(manifest.get("transforms"), list):
            raise PrunqError(f"{source}: missing or malformed 'transforms' list")
        _check_model(manifest.get("model") or {}, source)
        return manifest
    for key in ("model", "masked", "folded", "quant"):
        if key not in manifest:
            raise PrunqError(f"{source}: missing key {key!r}")
    if not isinstance(manifest["masked"], list) or not all(isinstance(n, str) for n in manifest["masked"]):
        raise PrunqError(f"{source}: masked: expected a list of layer names")
    folded = manifest["folded"]
    if not isinstance(folded, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in folded
    ):
        raise PrunqError(f"{source}: folded: expected a list of [conv, batchnorm] name pairs")
    if manifest["quant"] is not None and not isinstance(manifest["quant"], dict):
        raise PrunqError(f"{source}: quant: expected a mapping or null")
    _check_model(manifest["model"] or {}, source)
    transforms: list[dict[str, Any]] = []
    if manifest["masked"]:
        transforms.append({"op": "mask", "layers": list(manifest["masked"])})
    if manifest["folded"]:
        transforms.append({"op": "fold_bn", "pairs": [list(p) for p in manifest["folded"]]})
    if manifest["quant"] is not None:
        transforms.append({"op": "quantize_config", "config": dict(manifest["quant"])})
    model = dict(manifest["model"] or {})
    if model and "origin" not in model:
        model["origin"] = "zoo" if "name" in model else "user"
    return {"format": FORMAT, "prunq_version": manifest.get("prunq_version"), "model": model, "transforms": transforms}
