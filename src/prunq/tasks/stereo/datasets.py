"""Real stereo data: the bundled Middlebury *motorcycle* pair, and KITTI 2015 / SceneFlow from disk.

Every loader returns ``(left, right, disp)``: images float32 (3, H, W) in [0, 1] (grey is repeated to 3
channels, alpha dropped, 16-bit images scaled by 65535), and the LEFT disparity float32 (H, W) in pixels
with ``left[y, x] <-> right[y, x - d]`` and ``+inf`` where there is no ground truth (METHOD §6's
Middlebury convention, used for all). A missing folder or file, an unreadable file, or a left / right /
disparity size mismatch raises :class:`~prunq.core.errors.PrunqError` naming the path.

Layouts:

* KITTI 2015: ``<root>/training/image_2/*_10.png`` (left), ``image_3/`` (right), ``disp_occ_0/`` (or
  ``disp_noc_0/``): 16-bit PNG, disparity = value / 256, 0 = no ground truth;
* SceneFlow (FlyingThings3D): ``<root>/frames_cleanpass/<TRAIN|TEST>/<A|B|C>/<seq>/{left,right}/*.png``
  and ``<root>/disparity/<TRAIN|TEST>/<A|B|C>/<seq>/left/<frame>.pfm``; a PFM value that is not finite
  and > 0 becomes ``+inf``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from prunq.core.errors import PrunqError

__all__ = ["Kitti2015", "SceneFlow", "middlebury_motorcycle", "read_kitti_disparity", "read_pfm", "write_pfm"]

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
PathLike = str | os.PathLike


def middlebury_motorcycle() -> Sample:
    """The Middlebury 2014 *motorcycle* pair bundled with scikit-image, full size (500 x 741).

    Valid disparities are about 7-60 px; 27,226 pixels have no ground truth (``+inf``).

    >>> left, right, disp = middlebury_motorcycle()
    >>> tuple(left.shape), tuple(disp.shape), int(torch.isinf(disp).sum())
    ((3, 500, 741), (500, 741), 27226)
    """
    import skimage.data

    left, right, disp = skimage.data.stereo_motorcycle()
    disp = np.asarray(disp, dtype=np.float32).copy()
    disp[~(np.isfinite(disp) & (disp > 0))] = np.inf  # already inf; made explicit for safety
    return (
        _to_tensor(np.asarray(left), "motorcycle left"),
        _to_tensor(np.asarray(right), "motorcycle right"),
        torch.from_numpy(disp),
    )


def _to_tensor(img: np.ndarray, name: str) -> torch.Tensor:
    """(H, W[, C]) uint8/uint16/float image -> float32 (3, H, W) in [0, 1]."""
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise PrunqError(f"{name}: expected a grey, RGB or RGBA image, got shape {img.shape}")
    img = img[..., :3] if img.shape[2] >= 3 else np.repeat(img, 3, axis=2)
    if img.dtype == np.uint8:
        out = img.astype(np.float32) / 255.0
    elif img.dtype == np.uint16:
        out = img.astype(np.float32) / 65535.0
    else:
        out = img.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def _imread(path: Path) -> np.ndarray:
    import skimage.io

    if not path.is_file():
        raise PrunqError(f"{path}: no such file")
    try:
        return np.asarray(skimage.io.imread(path))
    except Exception as e:
        raise PrunqError(f"{path}: cannot read image ({e})") from e


def _check_sizes(left: torch.Tensor, right: torch.Tensor, disp: torch.Tensor, paths: Sequence[Path]) -> Sample:
    if not left.shape[1:] == right.shape[1:] == disp.shape:
        raise PrunqError(
            f"{paths[0]}: size mismatch: left {tuple(left.shape[1:])}, right {tuple(right.shape[1:])} "
            f"({paths[1]}), disparity {tuple(disp.shape)} ({paths[2]})"
        )
    return left, right, disp


def _need_dir(path: Path) -> Path:
    if not path.is_dir():
        raise PrunqError(f"{path}: no such directory")
    return path


# ---------------------------------------------------------------------------------------------- PFM


def read_pfm(path: PathLike) -> np.ndarray:
    """A PFM file as float32 (H, W) (``Pf``) or (H, W, 3) (``PF``), top row first.

    The header is ``PF|Pf``, ``width height``, then a scale whose sign gives the byte order (negative:
    little-endian); rows are stored bottom-to-top.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.pfm"
    >>> write_pfm(p, np.array([[1.0, 2.0], [3.0, 4.0]]))
    >>> read_pfm(p).tolist()
    [[1.0, 2.0], [3.0, 4.0]]
    """
    path = Path(path)
    if not path.is_file():
        raise PrunqError(f"{path}: no such file")
    data = path.read_bytes()
    # Four whitespace-separated tokens, then exactly one whitespace byte before the raster.
    m = re.match(rb"(P[Ff])\s+(\d+)\s+(\d+)\s+([-+0-9.eE]+)\s", data)
    if m is None:
        raise PrunqError(f"{path}: not a PFM file (bad header)")
    channels = 3 if m.group(1) == b"PF" else 1
    width, height = int(m.group(2)), int(m.group(3))
    try:
        scale = float(m.group(4))
    except ValueError:
        raise PrunqError(f"{path}: bad PFM scale {m.group(4)!r}") from None
    if width == 0 or height == 0 or scale == 0:
        raise PrunqError(f"{path}: bad PFM header (width {width}, height {height}, scale {scale})")
    count = width * height * channels
    raster = data[m.end() :]
    if len(raster) < 4 * count:
        raise PrunqError(f"{path}: truncated PFM ({len(raster)} bytes of raster, need {4 * count})")
    arr = np.frombuffer(raster, dtype="<f4" if scale < 0 else ">f4", count=count)
    shape = (height, width, 3) if channels == 3 else (height, width)
    return arr.reshape(shape)[::-1].astype(np.float32, order="C")  # a writable, native-endian copy


def write_pfm(path: PathLike, array: np.ndarray, little_endian: bool = True) -> None:
    """Write (H, W) or (H, W, 3) ``array`` as PFM (scale magnitude 1, rows bottom-to-top).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.pfm"
    >>> write_pfm(p, np.zeros((2, 3)), little_endian=False)
    >>> p.read_bytes()[:11]
    b'Pf\\n3 2\\n1.0\\n'
    """
    a = np.asarray(array)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise PrunqError(f"{path}: PFM holds (H, W) or (H, W, 3) arrays, got shape {a.shape}")
    header = f"{'PF' if a.ndim == 3 else 'Pf'}\n{a.shape[1]} {a.shape[0]}\n{-1.0 if little_endian else 1.0}\n"
    raster = np.ascontiguousarray(a[::-1], dtype="<f4" if little_endian else ">f4").tobytes()
    Path(path).write_bytes(header.encode("ascii") + raster)


# -------------------------------------------------------------------------------------------- KITTI


def read_kitti_disparity(path: PathLike) -> np.ndarray:
    """A KITTI 16-bit disparity PNG as float32 (H, W) px: value / 256, ``+inf`` where the value is 0.

    >>> import tempfile, pathlib, skimage.io
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "000000_10.png"
    >>> skimage.io.imsave(p, np.array([[0, 2560, 2688]], dtype=np.uint16), check_contrast=False)
    >>> read_kitti_disparity(p).tolist()
    [[inf, 10.0, 10.5]]
    """
    path = Path(path)
    raw = _imread(path)
    if raw.ndim != 2 or raw.dtype != np.uint16:
        raise PrunqError(f"{path}: expected a single-channel 16-bit PNG, got {raw.dtype} of shape {raw.shape}")
    disp = raw.astype(np.float32) / 256.0  # exact: value / 2**8 fits float32's 24-bit mantissa
    disp[raw == 0] = np.inf
    return disp


class Kitti2015(torch.utils.data.Dataset):
    """KITTI 2015 scene-flow training pairs (frame ``_10``) with disparity; item ``i`` is ``(left, right, disp)``.

    ``root`` holds ``training/``; ``occluded=False`` reads ``disp_noc_0`` (non-occluded pixels only).

    >>> Kitti2015("/nonexistent")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    prunq.core.errors.PrunqError: /nonexistent/training/image_2: no such directory
    """

    def __init__(self, root: PathLike, split: str = "training", occluded: bool = True) -> None:
        base = Path(root) / split
        left_dir = _need_dir(base / "image_2")
        right_dir = _need_dir(base / "image_3")
        disp_dir = _need_dir(base / ("disp_occ_0" if occluded else "disp_noc_0"))
        self.names = sorted(p.name for p in left_dir.glob("*_10.png"))
        if not self.names:
            raise PrunqError(f"{left_dir}: no *_10.png images")
        self.paths: list[tuple[Path, Path, Path]] = []
        for name in self.names:
            trio = (left_dir / name, right_dir / name, disp_dir / name)
            for p in trio[1:]:
                if not p.is_file():
                    raise PrunqError(f"{p}: no such file (pair of {trio[0]})")
            self.paths.append(trio)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Sample:
        lp, rp, dp = self.paths[i]
        left, right = _to_tensor(_imread(lp), str(lp)), _to_tensor(_imread(rp), str(rp))
        return _check_sizes(left, right, torch.from_numpy(read_kitti_disparity(dp)), (lp, rp, dp))


# ----------------------------------------------------------------------------------------- SceneFlow


class SceneFlow(torch.utils.data.Dataset):
    """FlyingThings3D-layout pairs with left disparity; item ``i`` is ``(left, right, disp)``.

    ``split`` is ``"TRAIN"`` or ``"TEST"``, ``frames`` the pass folder (``frames_cleanpass`` or
    ``frames_finalpass``), ``subsets`` the letter folders to include.

    >>> SceneFlow("/nonexistent")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    prunq.core.errors.PrunqError: /nonexistent/frames_cleanpass/TRAIN: no such directory
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "TRAIN",
        frames: str = "frames_cleanpass",
        subsets: Sequence[str] = ("A", "B", "C"),
    ) -> None:
        root = Path(root)
        img_root = _need_dir(root / frames / split)
        disp_root = _need_dir(root / "disparity" / split)
        self.paths: list[tuple[Path, Path, Path]] = []
        for letter in subsets:
            letter_dir = img_root / letter
            if not letter_dir.is_dir():
                continue  # a partial copy may hold only some subsets
            for left in sorted(letter_dir.glob("*/left/*.png")):
                seq = left.parent.parent.name
                right = left.parent.parent / "right" / left.name
                disp = disp_root / letter / seq / "left" / (left.stem + ".pfm")
                for p in (right, disp):
                    if not p.is_file():
                        raise PrunqError(f"{p}: no such file (pair of {left})")
                self.paths.append((left, right, disp))
        if not self.paths:
            raise PrunqError(f"{img_root}: no <{'|'.join(subsets)}>/<seq>/left/*.png images")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Sample:
        lp, rp, dp = self.paths[i]
        left, right = _to_tensor(_imread(lp), str(lp)), _to_tensor(_imread(rp), str(rp))
        disp = read_pfm(dp)
        if disp.ndim != 2:
            raise PrunqError(f"{dp}: expected a single-channel (Pf) disparity, got shape {disp.shape}")
        disp[~(np.isfinite(disp) & (disp > 0))] = np.inf
        return _check_sizes(left, right, torch.from_numpy(disp), (lp, rp, dp))
