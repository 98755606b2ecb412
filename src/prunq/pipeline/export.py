"""``prunq export`` / :func:`prunq.export`: deployable files from a run (METHOD.md §7).

Formats:

* ``packed`` (:mod:`prunq.export.packed`): the compressed model at the cost model's size, read back by
  :func:`prunq.load`;
* ``qonnx`` (:mod:`prunq.export.qonnx`): ONNX + ``Quant`` nodes, for qonnx's executor, hls4ml and FINN;
* ``onnx`` / ``onnx-int4`` (:mod:`prunq.export.onnx_qdq`): QDQ for ONNX Runtime (int8 weights, uint8
  activations: fused integer kernels) / the same with ≤ 4-bit weights as INT4 initializers (smaller, not
  faster); ``onnx-fp32``: the float network, a baseline;
* ``hls4ml`` (:mod:`prunq.export.hls`): an hls4ml C++ project (a directory) from the QONNX graph, with
  hls4ml's own figures in ``prunq_hls.json``; needs power-of-two steps (``quant.power_of_two: true``).

The ONNX formats need the ``export`` extra and example inputs (their graphs have fixed shapes): a run's
task gives them. Files are written atomically; what a format cannot express is a one-line
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
FORMATS = {"packed": ".packed", "qonnx": ".onnx", "onnx": ".onnx", "onnx-int4": ".onnx", "onnx-fp32": ".onnx"}
PACKED_FILE = "model.packed"


def _model_and_manifest(
    source: Any, remove_channels: bool = False, example_inputs: tuple | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A converted copy of the model and its manifest, from a run directory, a CompressResult, or a
    ``(model, manifest)`` pair; with ``remove_channels``, the smaller model
    (:func:`prunq.prune.structured.remove_channels`) and the manifest that records it."""
    from prunq.pipeline.io import load, read_manifest
    from prunq.quant.prepare import convert

    if isinstance(source, (str, Path)):
        d = Path(source)
        model, manifest = load(d, convert=True), read_manifest(d)
    else:
        model, manifest = source if isinstance(source, tuple) else (source.model, source.manifest)
        model = convert(copy.deepcopy(model)).eval()
        manifest = json.loads(json.dumps(manifest))
    if remove_channels:
        from prunq.prune.structured import remove_channels as remove

        r = remove(model, _example_inputs(source, example_inputs, "--remove-channels"), manifest)
        model, manifest = r.model.eval(), r.manifest
    return model, manifest


def run_example_inputs(run_dir: str | Path) -> tuple:
    """The example inputs of a run's task (its ``recipe.yaml``): what fixes an ONNX graph's shapes."""
    from prunq.pipeline.recipes import load_recipe
    from prunq.pipeline.runs import make_task
    from prunq.report.fsutil import inside_run

    return tuple(make_task(load_recipe(inside_run(Path(run_dir), "recipe.yaml"))).example_inputs())


def _example_inputs(source: Any, example_inputs: tuple | None, what: str) -> tuple:
    """The inputs that fix a graph's shapes: given, or (for a run directory) its task's."""
    if example_inputs is not None:
        return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not isinstance(source, (str, Path)):
        raise PrunqError(f"export: {what} needs example_inputs (the input shapes)")
    return run_example_inputs(source)


def _onnx(model: nn.Module, example_inputs: tuple, format: str) -> bytes:  # noqa: A002
    try:
        if format == "qonnx":
            from prunq.export.qonnx import to_qonnx

            proto = to_qonnx(model, example_inputs)
        else:
            from prunq.export.onnx_qdq import to_onnx_fp32, to_onnx_qdq

            if format == "onnx-fp32":
                proto = to_onnx_fp32(model, example_inputs)
            else:
                proto = to_onnx_qdq(model, example_inputs, int4=format == "onnx-int4")
    except ImportError as e:
        raise PrunqError(f"--format {format}: needs the export extra (pip install 'prunq[export]'; {e.name} is missing)") from None
    return proto.SerializeToString()


def export_bytes(
    source: Any, format: str = "packed", example_inputs: tuple | None = None, *, remove_channels: bool = False  # noqa: A002
) -> bytes:
    """The bytes of ``source`` (a run directory, a CompressResult, or ``(model, manifest)``) in ``format``.
    ``example_inputs`` fix the ONNX graphs' shapes (default for a run directory: its task's);
    ``remove_channels`` exports the smaller model without the channels pruning emptied."""
    if format not in FORMATS:
        raise PrunqError(f"--format: unknown format {format!r} (choose from {', '.join(FORMATS)})")
    model, manifest = _model_and_manifest(source, remove_channels, example_inputs)
    if format == "packed":
        return P.pack(model, manifest)
    return _onnx(model, _example_inputs(source, example_inputs, f"--format {format}"), format)


def export(
    source: Any, out: str | Path, format: str = "packed", example_inputs: tuple | None = None, *,  # noqa: A002
    remove_channels: bool = False,
) -> Path:
    """Write ``source`` in ``format`` to ``out`` (atomically). Returns ``out``. ``remove_channels``: the
    smaller model without the channels pruning emptied (recorded in the file, so it loads back).

    >>> prunq.export("runs/demo", "demo.packed")           # doctest: +SKIP
    >>> prunq.load("demo.packed")                          # doctest: +SKIP
    >>> prunq.export("runs/demo", "demo.onnx", "onnx")     # doctest: +SKIP  (ONNX Runtime, int8)
    """
    data = export_bytes(source, format, example_inputs, remove_channels=remove_channels)
    return atomic_write_bytes(Path(out), data)


def export_hls(
    source: Any, out: str | Path, example_inputs: tuple | None = None, *, overwrite: bool = False,
    remove_channels: bool = False,
) -> Path:
    """Write the hls4ml project of ``source`` into the directory ``out`` (atomically; not compiled: run
    ``make``/``build_lib.sh`` there, or :func:`prunq.export.hls.to_hls` with ``compile=True``), with
    hls4ml's figures per layer in ``out/prunq_hls.json``."""
    from prunq.report.fsutil import atomic_dir

    example_inputs = _example_inputs(source, example_inputs, "--format hls4ml")
    model, _ = _model_and_manifest(source, remove_channels, example_inputs)
    try:
        from prunq.export.hls import to_hls
    except ImportError as e:  # pragma: no cover - the module imports hls4ml lazily
        raise PrunqError(f"--format hls4ml: needs the hls4ml extra ({e})") from None
    guard = atomic_dir(Path(out), overwrite=overwrite)
    try:
        with guard as tmp:
            res = to_hls(model, tuple(example_inputs), Path(tmp) / "project", compile=False)
            figures = {"layers": res.layers, "totals": res.totals}
            (Path(tmp) / "prunq_hls.json").write_text(json.dumps(figures, indent=2, default=str))
    finally:
        guard.close()
    return Path(out)


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
