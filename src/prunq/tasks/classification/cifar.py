"""CIFAR-10 from disk, in either standard layout, with the ResNets of He et al. (2016).

Layouts (``data_dir`` is the batches folder itself or its parent):

* python version -- ``cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch``: pickled dicts with
  ``b"data"`` (N x 3072 uint8, the R, G and B planes of 32x32 row-major) and ``b"labels"``;
* binary version -- ``cifar-10-batches-bin/data_batch_1.bin .. data_batch_5.bin, test_batch.bin``:
  records of one label byte followed by the same 3072 bytes.

The training batches must be ``data_batch_1 .. data_batch_k`` with no gap (``k`` = 5 for the real
data set; fewer is accepted so that tiny fixtures and partial copies load).

The pickles are read with :class:`RestrictedUnpickler`, which resolves only the few numpy globals an
``ndarray`` pickle needs: a CIFAR file from an untrusted mirror can then build arrays, lists and dicts,
and nothing else -- a pickle that names any other global (``os.system``, ...) is refused with
:class:`~prunq.core.errors.PrunqError` before anything is called.
"""

from __future__ import annotations

import _codecs
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from prunq.core.errors import PrunqError
from prunq.tasks.classification.common import ClassificationTask, random_crop, random_hflip

__all__ = ["Cifar10Task", "RestrictedUnpickler", "find_cifar10", "load_cifar10", "CIFAR10_MEAN", "CIFAR10_STD"]

# Per-channel mean and standard deviation of the 50,000 training images (in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_IMAGE_BYTES = 3 * 32 * 32
_NUM_TRAIN_BATCHES = 5
_LAYOUTS = {"python": ("cifar-10-batches-py", ""), "binary": ("cifar-10-batches-bin", ".bin")}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals an ndarray pickle refers to, under both numpy 1 (``numpy.core``) and 2 (``numpy._core``)
    module names, each mapped to the live object (so the deprecated ``numpy.core`` is never imported)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # how protocol <= 2 pickles bytes under Python 3
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        if hasattr(numeric, "_frombuffer"):  # protocol 5 pickles of contiguous arrays
            allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays.

    ``find_class`` resolves ``numpy.ndarray``, ``numpy.dtype``, ``numpy(._)core.multiarray._reconstruct``,
    ``numpy(._)core.numeric._frombuffer`` and ``_codecs.encode``; any other global raises
    :class:`PrunqError` naming the file. Strings of Python 2 pickles are decoded as ``bytes``.
    """

    def __init__(self, file: BinaryIO, path: str | Path = "<pickle>") -> None:
        super().__init__(file, encoding="bytes")
        self.path = str(path)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object for ``module.name``; anything else is refused."""
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise PrunqError(
                f"{self.path}: refusing to unpickle global {module}.{name} "
                "(a CIFAR-10 batch holds only numpy arrays, lists and dicts)"
            ) from None


def _check_labels(labels: np.ndarray, n: int, path: Path) -> np.ndarray:
    """int64 labels of length ``n`` in 0..9, else PrunqError naming ``path``."""
    if labels.ndim != 1 or len(labels) != n:
        raise PrunqError(f"{path}: {len(labels)} labels for {n} images")
    if n and (labels.min() < 0 or labels.max() > 9):
        raise PrunqError(f"{path}: labels must be in 0..9, found {int(labels.min())}..{int(labels.max())}")
    return labels.astype(np.int64)


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 3, 32, 32) uint8, labels (N,) int64)`` from one python-version batch."""
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, path).load()
    except PrunqError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        raise PrunqError(f"{path}: not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise PrunqError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        raise PrunqError(f"{path}: missing key b'data' or b'labels' (keys: {sorted(map(repr, obj))})")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise PrunqError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), found {dtype} {shape}")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise PrunqError(f"{path}: b'labels' must be a list of integers") from None
    return data.reshape(-1, 3, 32, 32), _check_labels(label_array, len(data), path)


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 3, 32, 32) uint8, labels (N,) int64)`` from one binary-version batch."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % (_IMAGE_BYTES + 1):
        raise PrunqError(f"{path}: size {raw.size} bytes is not a multiple of a 3073-byte CIFAR-10 record")
    records = raw.reshape(-1, _IMAGE_BYTES + 1)
    labels = _check_labels(records[:, 0].astype(np.int64), len(records), path)
    return np.ascontiguousarray(records[:, 1:]).reshape(-1, 3, 32, 32), labels


def find_cifar10(data_dir: str | Path) -> tuple[Path, str]:
    """``(batches folder, "python" | "binary")`` for ``data_dir`` (the folder itself or its parent).

    The python layout wins when both are present.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise PrunqError(f"task.data_dir: {root} does not exist or is not a directory")
    for layout, (folder_name, ext) in _LAYOUTS.items():
        for folder in (root, root / folder_name):
            if (folder / f"data_batch_1{ext}").is_file() or (folder / f"test_batch{ext}").is_file():
                return folder, layout
    raise PrunqError(
        f"task.data_dir: no CIFAR-10 batches in {root} (expected cifar-10-batches-py/data_batch_1..5 and "
        "test_batch, or cifar-10-batches-bin/data_batch_1..5.bin and test_batch.bin, there or in a subfolder)"
    )


def load_cifar10(data_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: uint8 images (N, 3, 32, 32) and int64 labels.

    Missing files, unreadable pickles and bad shapes raise :class:`PrunqError` naming the file.
    """
    folder, layout = find_cifar10(data_dir)
    ext = _LAYOUTS[layout][1]
    read = _read_python_batch if layout == "python" else _read_binary_batch
    paths = [folder / f"data_batch_{i}{ext}" for i in range(1, _NUM_TRAIN_BATCHES + 1)]
    present = [p.is_file() for p in paths]
    last = max((i for i, ok in enumerate(present) if ok), default=0)
    for path, ok in zip(paths[: last + 1], present):
        if not ok:
            raise PrunqError(f"{path}: missing CIFAR-10 training batch")
    test_path = folder / f"test_batch{ext}"
    if not test_path.is_file():
        raise PrunqError(f"{test_path}: missing CIFAR-10 test batch")
    train = [read(p) for p in paths[: last + 1]]
    x_test, y_test = read(test_path)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return (
        torch.from_numpy(x_train),
        torch.from_numpy(y_train),
        torch.from_numpy(np.ascontiguousarray(x_test)),
        torch.from_numpy(y_test),
    )


class Cifar10Task(ClassificationTask):
    """CIFAR-10 on disk; metric top-1 on the 10,000-image test batch.

    Images stay uint8 in memory (150 MB for the training set) and are turned into float32 per batch:
    scaled to [0, 1], for training optionally augmented (``augment``: random 32x32 crop of the image
    zero-padded by 4 pixels, then a random horizontal flip), and normalised with
    :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`. ``limit`` keeps the first ``limit`` training images and
    the first ``limit`` test images, for quick runs (the metric is then not the protocol's).
    Models: ``resnet20`` (default), ``resnet32``, ``resnet56``.
    """

    name = "cifar10"
    default_model = "resnet20"
    model_names = ("resnet20", "resnet32", "resnet56")
    in_channels = 3
    num_classes = 10
    eval_batch_size = 500

    def __init__(self, data_dir: str, augment: bool = True, limit: int | None = None, seed: int = 0) -> None:
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise PrunqError(f"task.limit: must be a positive integer or null, got {limit!r}")
        x_train, y_train, x_test, y_test = load_cifar10(data_dir)
        if limit is not None:
            x_train, y_train, x_test, y_test = x_train[:limit], y_train[:limit], x_test[:limit], y_test[:limit]
        super().__init__(x_train, y_train, x_test, y_test, seed=seed)
        self.data_dir = str(data_dir)
        self.folder, self.layout = find_cifar10(data_dir)
        self.augment = bool(augment)
        self.limit = limit
        self._mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    def prepare(self, x: torch.Tensor, train: bool, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 (B, 3, 32, 32) -> normalised float32, augmented for training when ``augment`` is on."""
        out = x.float().div_(255.0)
        if train and self.augment and generator is not None:
            out = random_hflip(random_crop(out, 4, generator), generator)
        return (out - self._mean) / self._std
