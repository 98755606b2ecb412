"""Stereo loaders on fixtures written here in the exact on-disk formats, and the bundled Middlebury pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.io
import torch

from prunq.core.errors import PrunqError
from prunq.tasks.stereo.datasets import (
    Kitti2015,
    SceneFlow,
    middlebury_motorcycle,
    read_kitti_disparity,
    read_pfm,
    write_pfm,
)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    skimage.io.imsave(path, array, check_contrast=False)


def _rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- PFM

# A 2 x 3 single-channel image; PFM stores the bottom row (4, 5, 6) first.
_ARRAY = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, -6.5]], dtype=np.float32)
_RASTER = [4.0, 5.0, -6.5, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("little, scale, dtype", [(True, b"-1.0", "<f4"), (False, b"1.0", ">f4")])
def test_pfm_matches_hand_made_bytes_in_both_byte_orders(tmp_path, little, scale, dtype):
    hand = b"Pf\n3 2\n" + scale + b"\n" + np.array(_RASTER, dtype=dtype).tobytes()
    (tmp_path / "hand.pfm").write_bytes(hand)
    got = read_pfm(tmp_path / "hand.pfm")
    assert got.dtype == np.float32 and np.array_equal(got, _ARRAY)
    write_pfm(tmp_path / "ours.pfm", _ARRAY, little_endian=little)
    assert (tmp_path / "ours.pfm").read_bytes() == hand


def test_pfm_colour_round_trip_and_loose_header(tmp_path):
    rgb = np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32)
    for little in (True, False):
        write_pfm(tmp_path / "c.pfm", rgb, little_endian=little)
        assert np.array_equal(read_pfm(tmp_path / "c.pfm"), rgb)
    # Some writers put width and height on separate lines and use another scale magnitude.
    (tmp_path / "loose.pfm").write_bytes(b"Pf\n3\n2\n-0.5\n" + np.array(_RASTER, dtype="<f4").tobytes())
    assert np.array_equal(read_pfm(tmp_path / "loose.pfm"), _ARRAY)


def test_bad_pfm_files_are_named(tmp_path):
    (tmp_path / "short.pfm").write_bytes(b"Pf\n3 2\n-1.0\n" + b"\0" * 20)
    (tmp_path / "magic.pfm").write_bytes(b"P6\n3 2\n255\n" + b"\0" * 18)
    with pytest.raises(PrunqError, match="short.pfm: truncated"):
        read_pfm(tmp_path / "short.pfm")
    with pytest.raises(PrunqError, match="magic.pfm: not a PFM"):
        read_pfm(tmp_path / "magic.pfm")
    with pytest.raises(PrunqError, match="missing.pfm: no such file"):
        read_pfm(tmp_path / "missing.pfm")
    with pytest.raises(PrunqError, match=r"\(H, W\)"):
        write_pfm(tmp_path / "x.pfm", np.zeros((2, 2, 2)))


# -------------------------------------------------------------------------------------------- KITTI


def _kitti(root: Path, names=("000000", "000001"), h: int = 5, w: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    raws = []
    for k, name in enumerate(names):
        _png(root / "training/image_2" / f"{name}_10.png", _rgb(rng, h, w))
        _png(root / "training/image_3" / f"{name}_10.png", _rgb(rng, h, w))
        _png(root / "training/image_2" / f"{name}_11.png", _rgb(rng, h, w))  # other frame: ignored
        raw = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        raw[0, :3] = [0, 2560, 2560 + 128 + k]  # no ground truth, 10 px, 10.5 px (+ 1/256 for frame 1)
        _png(root / "training/disp_occ_0" / f"{name}_10.png", raw)
        raws.append(raw)
    return raws


def test_sixteen_bit_png_reads_back_exactly(tmp_path):
    raw = np.array([[0, 1, 255, 256], [257, 32768, 65534, 65535]], dtype=np.uint16)
    _png(tmp_path / "d.png", raw)
    back = skimage.io.imread(tmp_path / "d.png")
    assert back.dtype == np.uint16 and np.array_equal(back, raw)
    disp = read_kitti_disparity(tmp_path / "d.png")
    assert disp[0, 0] == np.inf
    assert disp[0, 1:].tolist() == [1 / 256, 255 / 256, 1.0]
    assert disp[1].tolist() == [257 / 256, 128.0, 65534 / 256, 65535 / 256]


def test_kitti_layout_loads_pairs_and_disparity(tmp_path):
    raws = _kitti(tmp_path)
    data = Kitti2015(tmp_path)
    assert len(data) == 2 and data.names == ["000000_10.png", "000001_10.png"]
    left, right, disp = data[1]
    assert left.shape == right.shape == (3, 5, 7) and disp.shape == (5, 7)
    assert left.dtype == disp.dtype == torch.float32 and 0 <= left.min() and left.max() <= 1
    expect_left = skimage.io.imread(tmp_path / "training/image_2/000001_10.png").astype(np.float32) / 255
    assert np.array_equal(left.permute(1, 2, 0).numpy(), expect_left)
    assert disp[0, :3].tolist() == [float("inf"), 10.0, 10.5 + 1 / 256]
    finite = raws[1] > 0
    assert np.array_equal(disp.numpy()[finite], raws[1][finite] / 256.0)


def test_kitti_missing_pieces_are_named(tmp_path):
    with pytest.raises(PrunqError, match="image_2: no such directory"):
        Kitti2015(tmp_path)
    _kitti(tmp_path)
    (tmp_path / "training/image_3/000001_10.png").unlink()
    with pytest.raises(PrunqError, match="image_3/000001_10.png: no such file"):
        Kitti2015(tmp_path)
    with pytest.raises(PrunqError, match="disp_noc_0: no such directory"):
        Kitti2015(tmp_path, occluded=False)


def test_kitti_size_mismatch_is_refused(tmp_path):
    _kitti(tmp_path)
    _png(tmp_path / "training/image_3/000000_10.png", _rgb(np.random.default_rng(1), 5, 8))
    data = Kitti2015(tmp_path)
    with pytest.raises(PrunqError, match="000000_10.png: size mismatch"):
        data[0]
    data[1]  # the other pair is fine


# ----------------------------------------------------------------------------------------- SceneFlow


def _sceneflow(root: Path, h: int = 4, w: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    disps = {}
    for letter, seq, frame in [("A", "0000", "0006"), ("A", "0000", "0007"), ("B", "0001", "0006")]:
        for side in ("left", "right"):
            _png(root / "frames_cleanpass/TRAIN" / letter / seq / side / f"{frame}.png", _rgb(rng, h, w))
        d = rng.uniform(0.5, 30.0, (h, w)).astype(np.float32)
        d[0, 0], d[0, 1] = -1.0, np.nan  # invalid values a real file can hold
        path = root / "disparity/TRAIN" / letter / seq / "left" / f"{frame}.pfm"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_pfm(path, d, little_endian=letter == "A")
        disps[f"{letter}/{seq}/{frame}"] = d
    return disps


def test_sceneflow_layout_loads_in_sorted_order(tmp_path):
    disps = _sceneflow(tmp_path)
    data = SceneFlow(tmp_path)
    assert len(data) == 3
    assert [p[0].relative_to(tmp_path).as_posix() for p in data.paths] == [
        "frames_cleanpass/TRAIN/A/0000/left/0006.png",
        "frames_cleanpass/TRAIN/A/0000/left/0007.png",
        "frames_cleanpass/TRAIN/B/0001/left/0006.png",
    ]
    left, right, disp = data[2]
    assert left.shape == right.shape == (3, 4, 6)
    expect = disps["B/0001/0006"].copy()
    expect[0, :2] = np.inf  # -1 and NaN have no ground truth
    assert np.array_equal(disp.numpy(), expect)
    assert len(SceneFlow(tmp_path, subsets=("B",))) == 1


def test_sceneflow_missing_pieces_are_named(tmp_path):
    with pytest.raises(PrunqError, match="frames_cleanpass/TRAIN: no such directory"):
        SceneFlow(tmp_path)
    _sceneflow(tmp_path)
    with pytest.raises(PrunqError, match="frames_finalpass/TRAIN: no such directory"):
        SceneFlow(tmp_path, frames="frames_finalpass")
    (tmp_path / "disparity/TRAIN/A/0000/left/0007.pfm").unlink()
    with pytest.raises(PrunqError, match="0000/left/0007.pfm: no such file"):
        SceneFlow(tmp_path)
    with pytest.raises(PrunqError, match="no <C>"):
        SceneFlow(tmp_path, subsets=("C",))


def test_sceneflow_size_mismatch_is_refused(tmp_path):
    _sceneflow(tmp_path)
    write_pfm(tmp_path / "disparity/TRAIN/B/0001/left/0006.pfm", np.ones((4, 5), np.float32))
    with pytest.raises(PrunqError, match="size mismatch"):
        SceneFlow(tmp_path)[2]


# ------------------------------------------------------------------------------------------ Middlebury


def test_middlebury_motorcycle_follows_the_protocol():
    left, right, disp = middlebury_motorcycle()
    assert left.shape == right.shape == (3, 500, 741) and disp.shape == (500, 741)
    assert left.dtype == right.dtype == disp.dtype == torch.float32
    assert 0 <= left.min() and left.max() <= 1
    finite = torch.isfinite(disp)
    assert int((~finite).sum()) == 27226 and not torch.isnan(disp).any()
    assert 7.0 <= disp[finite].min() and disp[finite].max() <= 60.0
    # left[y, x] <-> right[y, x - d]: with the true disparity the images agree far better than without.
    y, x = torch.nonzero(finite & (torch.arange(741) >= 70), as_tuple=True)
    xr = (x - disp[y, x]).round().long()
    matched = (left[:, y, x] - right[:, y, xr]).abs().mean()
    unmatched = (left[:, y, x] - right[:, y, x]).abs().mean()
    assert matched < 0.5 * unmatched
