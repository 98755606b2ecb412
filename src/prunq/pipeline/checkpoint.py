"""Work directories: checkpoints of a run in progress, so that a killed run resumes where it stopped.

``prunq compress RECIPE --out DIR`` keeps ``DIR.work/`` beside ``DIR`` while it runs and removes it once
``DIR`` is written; ``--resume`` continues from it. Every file is replaced atomically (written beside,
fsynced, renamed), so a kill at any moment leaves the previous checkpoint or the next, never half of one.
Tensors are safetensors; everything else is JSON (in the safetensors metadata) — never a pickle.

=========================  ==================================================================================
``work.json``              marker: what wrote it, the sha256 of the resolved recipe (a resume must match it)
``dense.safetensors``      the dense weights after training (or loading), with the dense history
``boundary.safetensors``   the run at the start of method ``i`` (``i`` = number of methods: all done): model
                           state, the global RNG; the stages done, their transforms, the history
``step.safetensors``       inside a fine-tuning (dense training or method ``i``): model, optimizer, RNG and
                           method state, data position, history — every ``--checkpoint-every`` steps
``points/``, ``rows/``     a sweep's finished grid points and their table rows
=========================  ==================================================================================

Resuming replays what an uninterrupted run does from the last checkpoint: the model is rebuilt from the
zoo, the finished stages' transforms are replayed (as :func:`prunq.load` does), the boundary's weights
are loaded; inside a method, the method is attached again (same weights, same RNG, so the same masks
and quantizers) and then its fine-tuning state is loaded. On one thread the result is bitwise the one an
uninterrupted run gives (tested by killing real runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from prunq.core.errors import PrunqError
from prunq.pipeline.io import tensor_bytes
from prunq.pipeline.training import FitState
from prunq.report.fsutil import atomic_write_bytes, atomic_write_text

WORK_FORMAT = 1
MARKER = "work.json"
DENSE = "dense.safetensors"
BOUNDARY = "boundary.safetensors"
STEP = "step.safetensors"
_META = "prunq_checkpoint"
#: Position of the dense training in a work directory (methods are 0, 1, ...).
DENSE_POSITION = -1


def work_dir_for(out: Path) -> Path:
    """``DIR.work`` beside ``DIR``."""
    return out.parent / f"{out.name}.work"


def recipe_digest(recipe_text: str) -> str:
    """What a resume checks: the sha256 of the resolved recipe's YAML."""
    return hashlib.sha256(recipe_text.encode()).hexdigest()


# -- JSON + tensors ------------------------------------------------------------------------------------
def pack(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """``obj`` as JSON, its tensors moved into ``tensors`` (``{"$t": key}`` in their place). Mappings with
    keys that are not strings (an optimizer's parameter indices) become ``{"$d": [[key, value], ...]}``,
    tuples lists."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj
        return {"$t": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: pack(v, tensors, prefix) for k, v in obj.items()}
        return {"$d": [[k, pack(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [pack(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`pack`."""
    if isinstance(obj, dict):
        if set(obj) == {"$t"}:
            return tensors[obj["$t"]]
        if set(obj) == {"$d"}:
            return {k: unpack(v, tensors) for k, v in obj["$d"]}
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def _write(path: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    packed = pack(state, tensors, "s")
    atomic_write_bytes(path, tensor_bytes(tensors, {_META: json.dumps(packed)}))


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if path.is_symlink():
        raise PrunqError(f"{path}: is a symbolic link; prunq does not follow links in a work directory")
    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get(_META)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        state = json.loads(meta) if meta is not None else None
    except (SafetensorError, OSError, ValueError, RecursionError) as e:
        raise PrunqError(f"{path}: unreadable checkpoint ({type(e).__name__}); remove the work directory") from None
    if not isinstance(state, dict):
        raise PrunqError(f"{path}: not a prunq checkpoint; remove the work directory")
    try:
        return unpack(state, tensors), tensors
    except (KeyError, TypeError, ValueError) as e:
        raise PrunqError(f"{path}: damaged checkpoint ({e}); remove the work directory") from None


class _fields:  # noqa: N801 - used like a function: ``with _fields(path):``
    """A checkpoint whose JSON lacks a field or has one of the wrong type is one line, not a traceback."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc_type is not None and issubclass(exc_type, (KeyError, TypeError, ValueError, IndexError)):
            raise PrunqError(f"{self.path}: damaged checkpoint ({type(exc).__name__}: {exc}); remove the work directory") from None
        return False


def snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of a state dict's tensors: what a checkpoint keeps while training goes on."""
    return {k: v.detach().clone() for k, v in state.items()}


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class StepCheckpoint:
    """A fine-tuning in progress: ``position`` (``-1`` dense training, else the method's index), the model
    and method state, the :class:`~prunq.pipeline.training.FitState`, the history, seconds spent."""

    position: int
    model: dict[str, torch.Tensor]
    method: Any
    fit: FitState
    history: list[dict]
    seconds: float


@dataclass
class Boundary:
    """The run at the start of method ``position``: weights, global RNG state, and the JSON ``record``
    (the stages done with their transforms, the history, the pruned model's figures)."""

    position: int
    model: dict[str, torch.Tensor]
    rng: torch.Tensor
    record: dict[str, Any]


class WorkDir:
    """The checkpoints of one run (see the module docstring). ``every``: steps between fine-tuning
    checkpoints (0: stage boundaries only)."""

    def __init__(self, path: Path, every: int, resumed: bool = False) -> None:
        self.path = Path(path)
        self.every = int(every)
        self.resumed = resumed

    # -- lifecycle ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, out: Path, recipe_text: str, *, command: str, resume: bool, every: int) -> WorkDir:
        """The work directory of ``--out``: created fresh, or (``resume``) the existing one, checked to be
        prunq's, of the same command and recipe. An existing one without ``resume`` is an error with the hint."""
        path = work_dir_for(Path(out))
        digest = recipe_digest(recipe_text)
        if path.exists() or path.is_symlink():
            marker = cls._marker(path)
            if marker is None:
                raise PrunqError(f"{path}: exists and is not a prunq work directory; choose another --out")
            if not resume:
                raise PrunqError(
                    f"{path}: an unfinished run of this --out is kept there; pass --resume to continue it, "
                    "or remove that directory to start over"
                )
            if marker.get("command") != command or marker.get("recipe_sha256") != digest:
                raise PrunqError(
                    f"{path}: holds an unfinished {marker.get('command')} run of a different recipe (or dense "
                    "checkpoint, or prunq version); --resume needs the same recipe and --set values (or remove "
                    "that directory to start over)"
                )
            work = cls(path, every, resumed=True)
            work._clean_temporaries()
            return work
        # Built beside and renamed into place: a kill never leaves a work directory without its marker.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
        atomic_write_text(tmp / MARKER, json.dumps(
            {"prunq_work": WORK_FORMAT, "command": command, "recipe_sha256": digest}, indent=2))  # fmt: skip
        os.rename(tmp, path)
        return cls(path, every)

    @staticmethod
    def _marker(path: Path) -> dict[str, Any] | None:
        f = path / MARKER
        if path.is_symlink() or not path.is_dir() or f.is_symlink() or not f.is_file() or f.stat().st_size > 1 << 16:
            return None
        try:
            data = json.loads(f.read_text())
        except (ValueError, OSError):
            return None
        return data if isinstance(data, dict) and data.get("prunq_work") == WORK_FORMAT else None

    def _clean_temporaries(self) -> None:
        """Half-written files of a killed writer (``.NAME.tmp-XXXXXXXX``)."""
        for p in self.path.rglob(".*"):
            if re.fullmatch(r"\..+\.(tmp|old)-[0-9a-f]{8}", p.name) and not p.is_symlink():
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def remove(self) -> None:
        """The run is written: its checkpoints are no longer needed. Renamed aside first, so a kill during
        the deletion leaves a hidden leftover the next run of this --out removes, never a half work dir."""
        if self._marker(self.path) is not None:
            gone = self.path.parent / f".{self.path.name}.old-{secrets.token_hex(4)}"
            os.rename(self.path, gone)
            shutil.rmtree(gone, ignore_errors=True)

    # -- dense ----------------------------------------------------------------------------------------
    def save_dense(self, state: dict[str, torch.Tensor], history: list[dict], seconds: float) -> None:  # noqa: D102
        _write(self.path / DENSE, {"history": history, "seconds": seconds}, {f"m.{k}": v for k, v in state.items()})
        (self.path / STEP).unlink(missing_ok=True)

    def dense(self) -> tuple[dict[str, torch.Tensor], list[dict], float] | None:
        """The dense weights, history and seconds, when the dense stage is done."""
        if not (self.path / DENSE).exists():
            return None
        state, tensors = _read(self.path / DENSE)
        return _prefixed(tensors, "m."), list(state["history"]), float(state["seconds"])

    # -- boundaries -----------------------------------------------------------------------------------
    def save_boundary(self, position: int, model_state: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        """The run before method ``position``; a fine-tuning checkpoint of an earlier method is dropped."""
        tensors = {f"m.{k}": v for k, v in model_state.items()}
        tensors["rng.cpu"] = torch.get_rng_state()
        _write(self.path / BOUNDARY, {"position": position, "record": record}, tensors)
        step = self.step()
        if step is not None and step.position < position:
            (self.path / STEP).unlink(missing_ok=True)

    def boundary(self) -> Boundary | None:  # noqa: D102
        if not (self.path / BOUNDARY).exists():
            return None
        state, tensors = _read(self.path / BOUNDARY)
        with _fields(self.path / BOUNDARY):
            record = state["record"]
            for key in ("stages", "history"):
                if not isinstance(record[key], list):
                    raise TypeError(f"{key} is not a list")
            return Boundary(int(state["position"]), _prefixed(tensors, "m."), tensors["rng.cpu"], record)

    # -- inside a fine-tuning -------------------------------------------------------------------------
    def save_step(self, position: int, model_state: dict[str, torch.Tensor], method_state: Any, fit: FitState,
                  history: list[dict], seconds: float) -> None:  # fmt: skip
        """A fine-tuning checkpoint of ``position``."""
        tensors = {f"m.{k}": v for k, v in model_state.items()}
        state = {
            "position": position, "method": method_state, "history": history, "seconds": seconds,
            "fit": {"step": fit.step, "running": fit.running, "first_loss": fit.first_loss, "low": fit.low,
                    "optimizer": fit.optimizer, "param_names": fit.param_names, "scheduler": fit.scheduler,
                    "rng": fit.rng, "data": list(fit.data)},
        }  # fmt: skip
        _write(self.path / STEP, state, tensors)

    def step(self, position: int | None = None) -> StepCheckpoint | None:
        """The fine-tuning checkpoint (of ``position`` only, when given)."""
        if not (self.path / STEP).exists():
            return None
        state, tensors = _read(self.path / STEP)
        with _fields(self.path / STEP):
            return self._step(state, tensors, position)

    @staticmethod
    def _step(state: dict[str, Any], tensors: dict[str, torch.Tensor], position: int | None) -> StepCheckpoint | None:
        if position is not None and state["position"] != position:
            return None
        f = state["fit"]
        fit = FitState(step=int(f["step"]), running=float(f["running"]), first_loss=float(f["first_loss"]),
                       low=float(f.get("low", f["running"])),
                       optimizer=f["optimizer"], param_names=list(f["param_names"]), scheduler=f["scheduler"],
                       rng=dict(f["rng"]), data=tuple(f["data"]))  # fmt: skip
        return StepCheckpoint(int(state["position"]), _prefixed(tensors, "m."), state["method"], fit,
                              list(state["history"]), float(state["seconds"]))  # fmt: skip

    def describe(self) -> str:
        """Where the run stopped, in words (for the hint and the divergence message)."""
        step = self.step()
        if step is not None:
            what = "dense training" if step.position == DENSE_POSITION else f"method {step.position + 1}"
            return f"{what}, step {step.fit.step}"
        b = self.boundary()
        if b is not None:
            return f"{b.position} method(s) done"
        return "dense model done" if (self.path / DENSE).exists() else "nothing yet"


__all__ = ["WorkDir", "snapshot", "work_dir_for", "pack", "unpack", "StepCheckpoint", "Boundary", "DENSE_POSITION"]
