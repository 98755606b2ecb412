"""Seeded synthetic stereo scenes with exact disparity, textured with scikit-image's bundled photos.

A scene is a slanted background plane plus 4-10 foreground planar patches (ellipse or polygon
silhouettes) at random depths, each textured with a randomly scaled/rotated crop of a bundled natural
photo or a procedural pattern (smooth noise, stripes, checkerboard). Rendering and its geometry are in
:mod:`prunq.tasks.stereo.surfaces`: for every left pixel marked ``nonoccluded``, bilinear sampling of the
right view at ``x - disp`` reproduces it (jitter off).

Everything is a pure function of the seed (given numpy's generator and the bundled photos; a photo
that fails to load raises PrunqError instead of silently changing the scenes). Photometric jitter draws
from its own stream, so turning it on changes the pixels but never the geometry.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from prunq.core.errors import PrunqError
from prunq.tasks.stereo.surfaces import (
    Ellipse,
    Everywhere,
    ImageTexture,
    PatternTexture,
    Polygon,
    StereoScene,
    Surface,
    Texture,
    render_surfaces,
)

__all__ = ["PHOTOS", "SyntheticStereo", "photometric_jitter", "render", "render_scene"]

Seed = int | Sequence[int]

# Bundled with scikit-image (no network). Chosen for texture; near-blank ones (page, text, retina,
# logo) are left out, and `cat` is the same photo as `chelsea`.
PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass",
    "gravel", "coins", "moon", "clock", "hubble_deep_field", "immunohistochemistry",
)  # fmt: skip
_SPLITS = {"train": 0, "val": 1, "test": 2}


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[torch.Tensor, ...]:
    """The bundled photos as float32 (3, h, w) tensors in [0, 1], loaded once per process."""
    import skimage.data

    out = []
    for name in PHOTOS:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception as e:
            # Refuse rather than skip: skipping would silently change every scene of every seed.
            raise PrunqError(f"skimage.data.{name}: bundled photo failed to load ({e})") from e
        img = img[..., None].repeat(3, axis=-1) if img.ndim == 2 else img[..., :3]
        out.append(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / 255.0))
    return tuple(out)


def _placement(
    rng: np.random.Generator, cx: float, cy: float, scale: float, tw: int, th: int
) -> tuple[float, float, float, float, float, float]:
    """Affine map from left pixels to texture pixels: rotate and scale about (cx, cy), random offset."""
    t = rng.uniform(0.0, 2.0 * math.pi)
    co, si = scale * math.cos(t), scale * math.sin(t)
    u0, v0 = rng.uniform(0, tw), rng.uniform(0, th)
    return (co, -si, u0 - co * cx + si * cy, si, co, v0 - si * cx - co * cy)


def _rgb(rng: np.random.Generator, lo: float, hi: float) -> tuple[float, float, float]:
    r, g, b = rng.uniform(lo, hi, 3).tolist()
    return (r, g, b)


def _texture(rng: np.random.Generator, cx: float, cy: float) -> Texture:
    """A random texture centred near (cx, cy): a photo crop (60 %), smooth noise, stripes or checker."""
    kind = rng.choice(4, p=[0.6, 0.2, 0.1, 0.1])
    if kind == 0:
        photos = _photos()
        img = photos[rng.integers(len(photos))]
        # Random gain per channel so that grey photos are not all grey and colours vary.
        gain = _rgb(rng, 0.6, 1.0)
        scale = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # texture px per image px
        return ImageTexture(img, _placement(rng, cx, cy, scale, img.shape[2], img.shape[1]), gain)
    if kind == 1:
        n = int(rng.integers(8, 65))
        img = torch.from_numpy(rng.uniform(0.0, 1.0, (3, n, n)).astype(np.float32))
        cell = rng.uniform(1.5, 10.0)  # image px per noise cell: from grainy to blotchy
        return ImageTexture(img, _placement(rng, cx, cy, 1.0 / cell, n, n))
    c0, c1 = _rgb(rng, 0.0, 1.0), _rgb(rng, 0.0, 1.0)
    return PatternTexture(
        "stripes" if kind == 2 else "checker",
        c0,
        c1,
        period=math.exp(rng.uniform(math.log(4.0), math.log(40.0))),
        angle=rng.uniform(0.0, math.pi),
        sharpness=rng.uniform(1.0, 6.0),
        phase=rng.uniform(0.0, 2.0 * math.pi),
    )


def _plane(
    rng: np.random.Generator, box: tuple[float, float, float, float], lo: float, hi: float, max_slope: float
) -> tuple[float, float, float]:
    """A random plane d = a + b x + c y whose values over ``box`` stay within [lo, hi]."""
    x0, x1, y0, y1 = box
    cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    gx, gy = rng.uniform(-max_slope, max_slope, 2) if rng.random() < 0.8 else (0.0, 0.0)
    reach = abs(gx) * hx + abs(gy) * hy  # largest change from the centre over the box
    if reach > 0.45 * (hi - lo):  # too steep for the range: flatten
        gx, gy = gx * 0.45 * (hi - lo) / reach, gy * 0.45 * (hi - lo) / reach
        reach = abs(gx) * hx + abs(gy) * hy
    d0 = rng.uniform(lo + reach, hi - reach)
    return (d0 - gx * cx - gy * cy, gx, gy)


def _surfaces(rng: np.random.Generator, H: int, W: int, min_disp: float, max_disp: float) -> list[Surface]:
    span = max_disp - min_disp
    image_box = (0.0, W - 1.0, 0.0, H - 1.0)
    # Background in the far part of the range, so most foreground objects stand in front of it.
    surfaces = [
        Surface(_plane(rng, image_box, min_disp, min_disp + 0.4 * span, 0.2), Everywhere(), _texture(rng, W / 2, H / 2))
    ]
    for _ in range(int(rng.integers(4, 11))):
        cx, cy = rng.uniform(-0.05 * W, 1.05 * W), rng.uniform(-0.05 * H, 1.05 * H)
        r = min(H, W) * math.exp(rng.uniform(math.log(0.06), math.log(0.4)))
        if rng.random() < 0.5:
            shape: Ellipse | Polygon = Ellipse(cx, cy, r, r * rng.uniform(0.3, 1.0), rng.uniform(0, math.pi))
        else:
            n = int(rng.integers(3, 9))
            ang = np.sort(rng.uniform(0, 2 * math.pi, n))
            rad = r * rng.uniform(0.4, 1.0, n)
            shape = Polygon(tuple(zip((cx + rad * np.cos(ang)).tolist(), (cy + rad * np.sin(ang)).tolist())))
        lo = min_disp + 0.1 * span
        plane = _plane(rng, shape.bbox(), lo, max_disp, 0.25)
        surfaces.append(Surface(plane, shape, _texture(rng, cx, cy)))
    return surfaces


def photometric_jitter(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One view's random gamma, contrast, brightness, per-channel gain and Gaussian noise, clipped to [0, 1].

    >>> img = torch.full((3, 4, 4), 0.5)
    >>> out = photometric_jitter(img, np.random.default_rng(0))
    >>> out.shape, bool(((out >= 0) & (out <= 1)).all())
    (torch.Size([3, 4, 4]), True)
    """
    gamma = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)
    gain = torch.from_numpy(rng.uniform(0.9, 1.1, (3, 1, 1)).astype(np.float32))
    sigma = rng.uniform(0.0, 0.02)
    # torch's generator draws the noise about twice as fast as numpy's; it is seeded from ``rng``, so
    # the result is still a function of ``rng`` alone. In-place ops: this runs once per view per item.
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    noise = torch.randn(image.shape, generator=gen).mul_(sigma)
    out = image.clamp(0.0, 1.0).pow_(gamma).sub_(0.5).mul_(contrast).add_(0.5 + brightness).mul_(gain)
    return out.add_(noise).clamp_(0.0, 1.0)


def _check_args(height: int, width: int, max_disp: float, min_disp: float) -> None:
    if height < 4 or width < 8:
        raise PrunqError(f"height, width: need at least 4 x 8 pixels, got {height} x {width}")
    if not 0 < min_disp < max_disp:
        raise PrunqError(f"max_disp: need 0 < min_disp ({min_disp}) < max_disp ({max_disp})")
    if max_disp >= width / 2:
        raise PrunqError(f"max_disp: {max_disp} px is too large for width {width} (must be < width / 2)")


def render(
    seed: Seed, height: int, width: int, max_disp: float, *, min_disp: float = 1.0, jitter: bool = False
) -> StereoScene:
    """The full synthetic scene for ``seed`` (images, disparity, ``nonoccluded``, right-view disparity).

    >>> scene = render(0, 32, 64, 12.0)
    >>> tuple(scene.left.shape), bool(scene.disp.min() >= 1.0), bool(scene.disp.max() <= 12.0)
    ((3, 32, 64), True, True)
    """
    _check_args(height, width, max_disp, min_disp)
    parts = [seed] if isinstance(seed, int) else list(seed)
    if not parts or not all(isinstance(p, int) and p >= 0 for p in parts):
        raise PrunqError(f"seed: expected a non-negative int or a sequence of them, got {seed!r}")
    seq = np.random.SeedSequence(seed)
    geo_seq, jit_seq = seq.spawn(2)  # independent streams: jitter never moves the geometry
    scene = render_surfaces(_surfaces(np.random.default_rng(geo_seq), height, width, min_disp, max_disp), height, width)
    if not jitter:
        return scene
    rng = np.random.default_rng(jit_seq)
    left, right = photometric_jitter(scene.left, rng), photometric_jitter(scene.right, rng)
    return StereoScene(left, right, scene.disp, scene.nonoccluded, scene.disp_right)


def render_scene(
    seed: Seed, height: int, width: int, max_disp: float, *, min_disp: float = 1.0, jitter: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(left, right, disp)`` of :func:`render`: (3, H, W), (3, H, W), (H, W) float32.

    >>> left, right, disp = render_scene(7, 32, 64, 12.0)
    >>> bool(torch.equal(disp, render_scene(7, 32, 64, 12.0)[2]))  # deterministic
    True
    """
    s = render(seed, height, width, max_disp, min_disp=min_disp, jitter=jitter)
    return s.left, s.right, s.disp


class SyntheticStereo(torch.utils.data.Dataset):
    """``n`` seeded scenes of one split; item ``i`` is ``(left, right, disp)``, rendered on the fly.

    Scene ``i`` of split ``split`` uses the seed ``(seed, SPLIT_ID, i)`` (train 0, val 1, test 2), so the
    splits never share a scene and ``n`` can grow without changing earlier items.

    >>> data = SyntheticStereo("val", n=2, height=32, width=64, max_disp=12.0)
    >>> len(data), tuple(data[1][0].shape)
    (2, (3, 32, 64))
    """

    def __init__(
        self,
        split: str,
        n: int,
        height: int,
        width: int,
        max_disp: float,
        seed: int = 0,
        jitter: bool = False,
        min_disp: float = 1.0,
    ) -> None:
        if split not in _SPLITS:
            raise PrunqError(f"split: expected one of {', '.join(_SPLITS)}, got {split!r}")
        if n < 1:
            raise PrunqError(f"n: need at least one scene, got {n}")
        if seed < 0:
            raise PrunqError(f"seed: must be >= 0, got {seed}")
        _check_args(height, width, max_disp, min_disp)
        self.split, self.n, self.height, self.width = split, n, height, width
        self.max_disp, self.min_disp, self.seed, self.jitter = max_disp, min_disp, seed, jitter

    def __len__(self) -> int:
        return self.n

    def scene_seed(self, i: int) -> tuple[int, int, int]:
        """The seed of item ``i`` (negative indices count from the end)."""
        if not -self.n <= i < self.n:
            raise IndexError(f"SyntheticStereo index {i} out of range for {self.n} scenes")
        return (self.seed, _SPLITS[self.split], i % self.n)

    def scene(self, i: int) -> StereoScene:
        """Item ``i`` with the extras (``nonoccluded``, ``disp_right``)."""
        return render(
            self.scene_seed(i), self.height, self.width, self.max_disp, min_disp=self.min_disp, jitter=self.jitter
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.scene(i)
        return s.left, s.right, s.disp
