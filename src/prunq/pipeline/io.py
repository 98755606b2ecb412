"""Saving and loading runs: safetensors weights + small JSON manifest; never unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from prunq.prune import masks as M
from prunq import quant as Q
from prunq.core.errors import PrunqError

MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "model.json"
PREVIEWS_FILE = "previews.safetensors"
DENSE_FILE = "dense.safetensors"


def save_model(directory: Path, model: nn.Module, manifest: dict[str, Any]) -> None:
    """Write ``model.safetensors`` (the full state dict: shadows, masks, quantizer steps) and ``model.json``."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(
        state, str(directory / MODEL_FILE), metadata={"format": "prunq", "version": str(manifest.get("format", 1))}
    )
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write named tensors as safetensors (detached, contiguous, on the CPU): previews, dense weights."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict; a missing or corrupt file is a PrunqError naming it."""
    p = Path(path)
    if not p.is_file():
        raise PrunqError(f"{p}: checkpoint not found")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PrunqError(f"{p}: not a readable safetensors checkpoint ({e})") from None


def _read_manifest(directory: Path) -> dict[str, Any]:
    p = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise PrunqError(f"{directory}: run directory not found")
    if not p.is_file():
        raise PrunqError(f"{p}: missing (is {directory} a prunq run directory?)")
    try:
        manifest = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PrunqError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("model", "masked", "folded", "quant"):
        if key not in manifest:
            raise PrunqError(f"{p}: missing key {key!r}")
    return manifest


def rebuild(model: nn.Module, manifest: dict[str, Any]) -> nn.Module:
    """Give a fresh ``model`` the compressed structure the manifest describes (masks, folds, quantizers)."""
    named = dict(model.named_modules())
    for name in manifest["masked"]:
        if name not in named:
            raise PrunqError(f"{MANIFEST_FILE}: layer {name!r} does not exist in the model")
        M.attach_mask(named[name], soft=False)
    pairs = [tuple(p) for p in manifest["folded"]]
    if pairs:
        Q.fold_bn_(model, pairs)
    if manifest["quant"] is not None:
        cfg = dict(manifest["quant"])
        cfg["exclude"] = tuple(cfg.get("exclude", ()))
        Q.prepare(model, Q.QuantConfig(**cfg))
    return model


def load(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a compressed model from a run directory, in eval mode.

    Pruned weights are exactly zero and every weight is on its quantization grid; activation quantizers
    are active. Models from prunq's zoo are rebuilt from ``model.json``; for your own architecture, pass a
    fresh instance as ``model``.

    >>> model = prunq.load("runs/demo")          # doctest: +SKIP
    """
    d = Path(directory)
    manifest = _read_manifest(d)
    if model is None:
        from prunq.tasks import build_model  # the zoo; lower layers stay free of tasks

        spec = manifest["model"]
        if not spec or "name" not in spec:
            raise PrunqError(f"{d / MANIFEST_FILE}: no zoo model recorded; pass model= to prunq.load")
        model = build_model(spec["task"], spec["name"], **spec.get("kwargs", {}))
    rebuild(model, manifest)
    state = load_state(d / MODEL_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PrunqError(f"{d / MODEL_FILE}: does not match the model ({str(e).splitlines()[0]})") from None
    return model.eval()
