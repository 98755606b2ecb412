"""Saving and loading runs: safetensors weights + small JSON manifest; never unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from prunq.core.errors import PrunqError
from prunq.core.manifest import replay, upgrade
from prunq.report.fsutil import inside_run

MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "model.json"
PREVIEWS_FILE = "previews.safetensors"
DENSE_FILE = "dense.safetensors"
TIMING_FILE = "timing.json"


#: The one metadata entry of ``model.safetensors``. One key on purpose: safetensors writes its metadata
#: from a hash map, so two keys come out in either order and the same model would give different bytes.
MODEL_METADATA_KEY = "prunq_manifest_format"


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors encoding of named tensors (detached, contiguous, on the CPU): the same tensors give
    the same bytes (tensors are laid out by dtype and name; at most one metadata key, see above). Each
    tensor is copied: tied weights share storage, which safetensors refuses."""
    if metadata is not None and len(metadata) > 1:
        raise ValueError("one metadata key at most: safetensors orders several at random")
    return safetensors_bytes({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, metadata=metadata)


def save_model(directory: Path, model: nn.Module, manifest: dict[str, Any]) -> None:
    """Write ``model.safetensors`` (the full state dict: shadows, masks, quantizer steps) and ``model.json``.

    Byte-for-byte reproducible: the same weights and manifest give the same files (checksum them)."""
    state = model.state_dict()
    meta = {MODEL_METADATA_KEY: str(manifest.get("format", 1))}
    write_bytes(directory / MODEL_FILE, tensor_bytes(state, meta))
    write_bytes(directory / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write named tensors as safetensors: previews, dense weights (reproducible bytes, usual file mode)."""
    write_bytes(path, tensor_bytes(tensors))


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file with the mode every other file of a run gets (0666 less the umask; safetensors' own
    writer makes private 0600 files)."""
    Path(path).write_bytes(data)


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict; a missing or corrupt file is a PrunqError naming it."""
    p = Path(path)
    if not p.is_file():
        raise PrunqError(f"{p}: checkpoint not found")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PrunqError(f"{p}: not a readable safetensors checkpoint ({e})") from None


def read_manifest(directory: Path) -> dict[str, Any]:
    """``model.json`` of a run directory, as a format-2 transform log (format 1 is upgraded), checked
    against the manifest's schema (:func:`prunq.core.manifest.validate`) before anything is built."""
    from prunq.core.manifest import MAX_BYTES

    if not directory.is_dir():
        raise PrunqError(f"{directory}: run directory not found")
    p = inside_run(directory, MANIFEST_FILE)
    if not p.is_file():
        raise PrunqError(f"{p}: missing (is {directory} a prunq run directory?)")
    if p.stat().st_size > MAX_BYTES:
        raise PrunqError(f"{p}: {p.stat().st_size:,} bytes, over the limit of {MAX_BYTES:,} for a manifest")
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge integers, deep nesting
        first = str(e).splitlines()[0] if str(e) else ""
        raise PrunqError(f"{p}: not valid JSON ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(manifest, dict):
        raise PrunqError(f"{p}: expected a JSON object")
    return upgrade(manifest, str(p))


def rebuild(model: nn.Module, manifest: dict[str, Any], source: str = MANIFEST_FILE) -> nn.Module:
    """Give a fresh ``model`` the compressed structure the manifest's transforms describe, in order."""
    return replay(model, manifest["transforms"], source)


def load(directory: str | Path, model: nn.Module | None = None, *, convert: bool = False) -> nn.Module:
    """Load a compressed model from a run directory, in eval mode.

    Pruned weights are exactly zero and every weight is on its quantization grid; activation quantizers
    are active. Models from prunq's zoo are rebuilt from ``model.json``; a run made with your own
    architecture needs a fresh instance as ``model``. The manifest's transforms are replayed (in order,
    through a fixed map of operation names) before the weights are loaded, so transforms that change the
    model's structure or tensor shapes load too. ``convert=True`` bakes masks and weight quantizers into
    plain weights (:func:`prunq.convert`: same outputs, no per-forward weight fake-quant — the fast form
    for inference; it can no longer be fine-tuned with its masks).

    A packed file (``prunq export --format packed``, ``runs/demo/model.packed``) loads too: it holds the
    converted model, so ``convert`` makes no difference there.

    >>> model = prunq.load("runs/demo")          # doctest: +SKIP
    >>> model = prunq.load("runs/demo/model.packed")  # doctest: +SKIP
    """
    import prunq.methods  # noqa: F401  (registers the transforms' replay functions)

    d = Path(directory)
    if d.is_file():
        from prunq.pipeline.export import load_packed

        return load_packed(d, model)
    manifest = read_manifest(d)
    if model is None:
        from prunq.tasks import TASKS, build_model  # the zoo; lower layers stay free of tasks

        spec = manifest.get("model") or {}
        if spec.get("origin") != "zoo" or "name" not in spec:
            cls = spec.get("class")
            what = f"your own model ({cls})" if cls else "your own model"
            raise PrunqError(f"{d}: the run compressed {what}; pass a fresh instance: prunq.load(dir, model=...)")
        if spec["task"] not in TASKS:
            raise PrunqError(f"{d / MANIFEST_FILE}: model.task: unknown task {spec['task']!r} (choose from {', '.join(TASKS)})")
        try:  # the zoo checks every argument's range and the parameter count before allocating
            model = build_model(spec["task"], spec["name"], **(spec.get("kwargs") or {}))
        except PrunqError as e:
            raise PrunqError(f"{d / MANIFEST_FILE}: {e}") from None
        except TypeError as e:
            raise PrunqError(f"{d / MANIFEST_FILE}: model: {e}") from None
    model = rebuild(model, manifest, str(d / MANIFEST_FILE))
    state = load_state(inside_run(d, MODEL_FILE))
    _load_strict(model, state, d / MODEL_FILE)
    _check_values(state, d / MODEL_FILE)
    if convert:
        from prunq.quant.prepare import convert as bake

        bake(model)
    return model.eval()


def _check_values(state: dict[str, torch.Tensor], path: Path) -> None:
    """Loaded weights must be finite and pruning masks binary (a corrupted or crafted file otherwise loads
    and evaluates silently)."""
    for key, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise PrunqError(f"{path}: {key} holds non-finite values")
        if key.endswith(".mask") and not bool(((v == 0) | (v == 1)).all()):
            raise PrunqError(f"{path}: {key} is not a binary mask")


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)``; a mismatch names the keys (missing, unexpected, mis-shaped)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes)):
            if keys:
                parts.append(f"{what}: {', '.join(keys[:3])}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""))
        raise PrunqError(f"{path}: does not match the model ({'; '.join(parts)})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PrunqError(f"{path}: does not match the model ({str(e).splitlines()[0]})") from None


def save(result: Any, directory: str | Path) -> Path:
    """Write a :class:`~prunq.pipeline.run.CompressResult` (or ``(model, manifest)``) as a loadable run:
    ``model.safetensors`` + ``model.json``, and ``metrics.json`` when the result has metrics. The
    directory is created; existing files of these names are replaced. A model converted after the run
    (``prunq.convert``) is recorded with a final ``convert`` transform.

    >>> prunq.save(prunq.compress(model, task, recipe), "runs/mine")   # doctest: +SKIP
    >>> prunq.load("runs/mine", model=MyNet())                          # doctest: +SKIP
    """
    from prunq.core.records import record_conversion

    if isinstance(result, tuple):
        model, manifest, metrics = result[0], result[1], None
    else:
        model, manifest, metrics = result.model, result.manifest, result.metrics
    manifest = json.loads(json.dumps(manifest))  # a copy, JSON-safe
    record_conversion(manifest, model)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_model(d, model, manifest)
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return d
