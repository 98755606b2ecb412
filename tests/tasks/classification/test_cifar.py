"""CIFAR-10 loading on fixtures written here in both on-disk formats, and the restricted unpickler."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from prunq.core.errors import PrunqError
from prunq.tasks import get_task
from prunq.tasks.classification.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Cifar10Task,
    RestrictedUnpickler,
    load_cifar10,
)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test (flat)


def _make(n_batches: int = 2, n: int = 20, n_test: int = 10, seed: int = 0) -> tuple[list, tuple]:
    rng = np.random.default_rng(seed)
    train = [
        (rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist())
        for _ in range(n_batches)
    ]
    test = (rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), rng.integers(0, 10, n_test).tolist())
    return train, test


def _pickle_bytes(data: np.ndarray, labels: list[int], protocol: int, legacy: bool = False) -> bytes:
    blob = pickle.dumps({b"batch_label": b"x", b"labels": labels, b"data": data}, protocol=protocol)
    if legacy:  # how numpy 1.x (and the real Python 2 CIFAR files) name the reconstructor
        blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"numpy.core.multiarray" in blob
    return blob


def write_python(root: Path, protocol: int = 2, legacy: bool = False, **kw: int) -> Arrays:
    """The python layout under ``root/cifar-10-batches-py``; returns what was written."""
    train, test = _make(**kw)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, (data, labels) in enumerate(train, start=1):
        (folder / f"data_batch_{i}").write_bytes(_pickle_bytes(data, labels, protocol, legacy))
    (folder / "test_batch").write_bytes(_pickle_bytes(*test, protocol, legacy))
    return _flat(train, test)


def write_binary(root: Path, **kw: int) -> Arrays:
    """The binary layout under ``root/cifar-10-batches-bin``; returns what was written."""
    train, test = _make(**kw)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)

    def records(data: np.ndarray, labels: list[int]) -> bytes:
        return np.concatenate([np.array(labels, np.uint8)[:, None], data], axis=1).tobytes()

    for i, batch in enumerate(train, start=1):
        (folder / f"data_batch_{i}.bin").write_bytes(records(*batch))
    (folder / "test_batch.bin").write_bytes(records(*test))
    return _flat(train, test)


def _flat(train: list, test: tuple) -> Arrays:
    return (
        np.concatenate([d for d, _ in train]),
        np.concatenate([l for _, l in train]),
        test[0],
        np.array(test[1]),
    )


def _assert_loaded(loaded: tuple[torch.Tensor, ...], written: Arrays) -> None:
    x_tr, y_tr, x_te, y_te = loaded
    assert x_tr.shape == (40, 3, 32, 32) and x_tr.dtype == torch.uint8 and y_tr.dtype == torch.int64
    np.testing.assert_array_equal(x_tr.numpy().reshape(40, 3072), written[0])
    np.testing.assert_array_equal(y_tr.numpy(), written[1])
    np.testing.assert_array_equal(x_te.numpy().reshape(10, 3072), written[2])
    np.testing.assert_array_equal(y_te.numpy(), written[3])


@pytest.mark.parametrize(("protocol", "legacy"), [(2, False), (2, True), (4, False), (5, False)])
def test_python_layout_roundtrip(tmp_path: Path, protocol: int, legacy: bool) -> None:
    written = write_python(tmp_path, protocol=protocol, legacy=legacy)
    _assert_loaded(load_cifar10(tmp_path), written)  # the parent ...
    _assert_loaded(load_cifar10(tmp_path / "cifar-10-batches-py"), written)  # ... or the folder itself


def _python2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch exactly as Python 2 + numpy 1 pickled the real download (protocol 2, byte strings),
    spelled opcode by opcode since no Python 2 is at hand."""

    def s(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + len(b).to_bytes(4, "little")) + b

    n = len(data)
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
        + b"(K\x01J" + n.to_bytes(4, "little") + b"M\x00\x0c\x86"  # state: version, shape (n, 3072)
        + b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89" + s(data.tobytes()) + b"tb"
    )
    label_ops = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    head = b"\x80\x02}(" + s(b"batch_label") + s(b"training batch 1 of 5")
    return head + s(b"data") + array + s(b"labels") + label_ops + b"u."


def test_python2_era_pickles_load(tmp_path: Path) -> None:
    train, test = _make()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i, batch in enumerate(train, start=1):
        (folder / f"data_batch_{i}").write_bytes(_python2_pickle(*batch))
    (folder / "test_batch").write_bytes(_python2_pickle(*test))
    _assert_loaded(load_cifar10(tmp_path), _flat(train, test))


def test_binary_layout_roundtrip(tmp_path: Path) -> None:
    written = write_binary(tmp_path)
    _assert_loaded(load_cifar10(tmp_path), written)
    _assert_loaded(load_cifar10(tmp_path / "cifar-10-batches-bin"), written)


def test_channel_planes_are_rgb(tmp_path: Path) -> None:
    """Bytes 0..1023 are the red plane, row-major: pixel (row 1, col 2) of red is byte 34."""
    written = write_binary(tmp_path)
    x = load_cifar10(tmp_path)[0]
    assert int(x[0, 0, 1, 2]) == int(written[0][0, 34]) and int(x[0, 2, 0, 0]) == int(written[0][0, 2048])


def test_task_normalises_and_batches(tmp_path: Path) -> None:
    written = write_python(tmp_path)
    task = Cifar10Task(str(tmp_path), augment=False)
    assert (task.name, task.metric_name, task.layout) == ("cifar10", "top1", "python")
    (x,) = task.example_inputs()
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    # pixel (c=1, row 0, col 5) of the first test image, by hand
    expected = (written[2][0, 1024 + 5] / 255 - CIFAR10_MEAN[1]) / CIFAR10_STD[1]
    assert float(x[0, 1, 0, 5]) == pytest.approx(expected, abs=1e-6)
    batches = list(task.train_batches(16, seed=0))
    assert [len(y) for _, y in batches] == [16, 16, 8]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(written[1].tolist())


def test_augmentation_seeded_and_only_for_training(tmp_path: Path) -> None:
    write_binary(tmp_path)
    plain, aug = Cifar10Task(str(tmp_path), augment=False), Cifar10Task(str(tmp_path))
    xp, yp = next(iter(plain.train_batches(40, 1)))
    xa, ya = next(iter(aug.train_batches(40, 1)))
    assert torch.equal(yp, ya) and xa.shape == xp.shape and not torch.equal(xa, xp)
    assert torch.equal(xa, next(iter(aug.train_batches(40, 1)))[0])
    assert torch.equal(plain.example_inputs()[0], aug.example_inputs()[0])


def test_limit_and_evaluate(tmp_path: Path) -> None:
    write_python(tmp_path)
    task = get_task("cifar10", data_dir=str(tmp_path), limit=7)
    assert isinstance(task, Cifar10Task) and len(task.y_train) == 7 and len(task.y_test) == 7
    torch.manual_seed(0)
    model = task.build_model("resnet20", width=0.25)
    model.train()
    out = task.evaluate(model)
    assert out["n"] == 7 and out["metric"] in {k / 7 for k in range(8)} and model.training
    with pytest.raises(PrunqError, match="task.limit"):
        Cifar10Task(str(tmp_path), limit=0)
    with pytest.raises(PrunqError, match="model.name: unknown model 'digits_cnn' for task 'cifar10'"):
        task.build_model("digits_cnn")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_disallowed_global_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2)
    with pytest.raises(PrunqError, match=r"refusing to unpickle global (posix|os|nt)\.system"):
        RestrictedUnpickler(io.BytesIO(blob)).load()
    folder = tmp_path / "cifar-10-batches-py"
    write_python(tmp_path / "ok")
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(blob)
    (folder / "test_batch").write_bytes((tmp_path / "ok/cifar-10-batches-py/test_batch").read_bytes())
    with pytest.raises(PrunqError, match="data_batch_1: refusing"):
        Cifar10Task(str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize(("module", "name"), [("builtins", "eval"), ("numpy", "load"), ("subprocess", "run")])
def test_only_the_ndarray_globals_are_allowed(module: str, name: str) -> None:
    blob = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."
    with pytest.raises(PrunqError, match=f"{module}.{name}"):
        RestrictedUnpickler(io.BytesIO(blob), "f.pkl").load()


def test_missing_directory_and_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(PrunqError, match=f"task.data_dir: {missing}"):
        Cifar10Task(str(missing))
    with pytest.raises(PrunqError, match=f"no CIFAR-10 batches in {tmp_path}"):
        Cifar10Task(str(tmp_path))
    write_python(tmp_path, n_batches=3)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_2").unlink()
    with pytest.raises(PrunqError, match="data_batch_2: missing"):
        load_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(PrunqError, match="test_batch: missing"):
        load_cifar10(tmp_path)


def test_bad_contents_name_the_file(tmp_path: Path) -> None:
    write_python(tmp_path / "py")
    folder = tmp_path / "py" / "cifar-10-batches-py"
    good_test = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((10, 100), np.uint8), b"labels": [0] * 10}))
    with pytest.raises(PrunqError, match=r"test_batch: b'data' must be a uint8 array of shape \(N, 3072\)"):
        load_cifar10(tmp_path / "py")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9}))
    with pytest.raises(PrunqError, match="test_batch: 9 labels for 10 images"):
        load_cifar10(tmp_path / "py")
    (folder / "test_batch").write_bytes(good_test[: len(good_test) // 2])
    with pytest.raises(PrunqError, match="test_batch: not a readable CIFAR-10 python batch"):
        load_cifar10(tmp_path / "py")

    write_binary(tmp_path / "bin")
    path = tmp_path / "bin" / "cifar-10-batches-bin" / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(PrunqError, match="data_batch_2.bin: size"):
        load_cifar10(tmp_path / "bin")
    path.write_bytes(bytes([10]) + bytes(3072))
    with pytest.raises(PrunqError, match=r"data_batch_2.bin: labels must be in 0..9"):
        load_cifar10(tmp_path / "bin")
