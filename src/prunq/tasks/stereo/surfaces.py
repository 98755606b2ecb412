"""Exact two-view rendering of textured planar surfaces, with occlusion (the synthetic-data engine).

Geometry (rectified pair, pixel centres at integer coordinates, left image is the reference):

* each :class:`Surface` has a silhouette (a :class:`Shape`) and a texture, both defined in LEFT pixel
  coordinates ``(x, y)``, and a disparity that is affine in them, ``d(x, y) = a + b x + c y`` -- exactly
  the disparity of a 3-D plane seen by a pinhole camera (1/depth is affine in image coordinates);
* a surface point at left ``(x, y)`` appears in the right view at ``(x - d(x, y), y)``; conversely right
  pixel ``xr`` sees the point with ``x = (xr + a + c y) / (1 - b)`` (needs ``b < 1``);
* visibility is a per-pixel z-buffer in both views: larger disparity = nearer = wins (ties go to the
  earlier surface), which is correct even for interpenetrating slanted planes;
* the RIGHT view is rendered by that inverse map: right pixel ``(xr, y)`` of surface ``s`` has colour
  ``R_s(xr, y) = texture_s(x_s(xr), y)``;
* the LEFT view is rendered from the same per-surface right-view samples: a left pixel of surface ``s``
  with ``xr = x - d`` gets the linear interpolation of ``R_s`` at columns ``floor(xr)`` and
  ``floor(xr) + 1``. This makes the texture piecewise linear between right-pixel positions, so wherever
  both of those right pixels show ``s``, *bilinear sampling of the right image at x - d reproduces the
  left pixel exactly* (up to float32 rounding) -- the property a training target needs. Both views
  sample the texture bilinearly at sub-pixel positions, so their sharpness statistics match.

``nonoccluded[y, x]`` is true where the right pixels bracketing ``x - d`` (one pixel when ``x - d`` is
whole) lie inside the right image and show the left pixel's surface. It is conservative by at most one
pixel at occlusion edges (and would miss a sliver thinner than a pixel in front of the point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from prunq.core.errors import PrunqError

__all__ = [
    "Ellipse",
    "Everywhere",
    "ImageTexture",
    "PatternTexture",
    "Polygon",
    "Shape",
    "StereoScene",
    "Surface",
    "Texture",
    "render_surfaces",
]


class Shape(Protocol):
    """A silhouette in left pixel coordinates."""

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Boolean mask, broadcast over ``x`` and ``y`` (float arrays)."""

    def bbox(self) -> tuple[float, float, float, float]:
        """``(x0, x1, y0, y1)`` enclosing the shape (may be infinite)."""


@dataclass(frozen=True)
class Everywhere:
    """The whole plane (a background)."""

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.ones(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=bool)

    def bbox(self) -> tuple[float, float, float, float]:
        return (-math.inf, math.inf, -math.inf, math.inf)


@dataclass(frozen=True)
class Ellipse:
    """Centre ``(cx, cy)``, semi-axes ``rx, ry``, rotated by ``angle`` radians."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        co, si = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.cx, y - self.cy
        u, v = (co * dx + si * dy) / self.rx, (co * dy - si * dx) / self.ry
        return u * u + v * v <= 1.0

    def bbox(self) -> tuple[float, float, float, float]:
        co, si = math.cos(self.angle), math.sin(self.angle)
        hx, hy = math.hypot(self.rx * co, self.ry * si), math.hypot(self.rx * si, self.ry * co)
        return (self.cx - hx, self.cx + hx, self.cy - hy, self.cy + hy)


@dataclass(frozen=True)
class Polygon:
    """A simple polygon (even-odd rule) given by its vertices ``((x, y), ...)``."""

    vertices: tuple[tuple[float, float], ...]

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # Crossing number: count edges crossed by a ray going right from the point; vectorised over
        # pixels, a Python loop only over the few edges.
        out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=bool)
        vs = self.vertices
        for (x1, y1), (x2, y2) in zip(vs, vs[1:] + vs[:1]):
            if y1 == y2:
                continue  # a horizontal edge is never crossed by a horizontal ray (even-odd rule)
            straddles = (y1 > y) != (y2 > y)
            x_cross = x1 + (y - y1) * ((x2 - x1) / (y2 - y1))
            out ^= straddles & (x < x_cross)
        return out

    def bbox(self) -> tuple[float, float, float, float]:
        xs, ys = zip(*self.vertices)
        return (min(xs), max(xs), min(ys), max(ys))


class Texture(Protocol):
    """An RGB texture over left pixel coordinates."""

    def sample(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Colours in [0, 1], float32 of shape ``(3, *x.shape)`` for same-shaped ``x``, ``y``."""


@dataclass(frozen=True, eq=False)
class ImageTexture:
    """An image (float32 tensor (3, h, w) in [0, 1]) placed by an affine map into its pixel coordinates.

    ``u = m[0] x + m[1] y + m[2]``, ``v = m[3] x + m[4] y + m[5]`` (texture column, row); outside the
    image it is mirrored, so any placement covers the plane. ``gain`` scales the channels (in [0, 1]).
    """

    image: torch.Tensor
    affine: tuple[float, float, float, float, float, float]
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def sample(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        m = self.affine
        _, h, w = self.image.shape
        u, v = m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]
        # grid_sample's normalised coordinates with align_corners=False: pixel i spans [i, i+1) -> centre i.
        grid = np.empty((*np.shape(u), 2), dtype=np.float32)
        grid[..., 0] = (2.0 * u + 1.0) / w - 1.0
        grid[..., 1] = (2.0 * v + 1.0) / h - 1.0
        grid_t = torch.from_numpy(grid).reshape(1, -1, 1, 2)
        out = F.grid_sample(self.image[None], grid_t, mode="bilinear", padding_mode="reflection", align_corners=False)
        out = out.reshape(3, *np.shape(u)).numpy()
        if self.gain != (1.0, 1.0, 1.0):  # after sampling: cheaper than scaling a whole photo
            out *= np.asarray(self.gain, dtype=np.float32).reshape(3, *([1] * (out.ndim - 1)))
        return out


@dataclass(frozen=True)
class PatternTexture:
    """Smooth procedural stripes or checkerboard between two colours.

    ``period`` in pixels, ``angle`` in radians; ``sharpness`` (> 0) steepens the edges (a tanh of a sine,
    kept smooth so that the pattern is not aliased).
    """

    kind: str  # "stripes" or "checker"
    color0: tuple[float, float, float]
    color1: tuple[float, float, float]
    period: float
    angle: float = 0.0
    sharpness: float = 3.0
    phase: float = 0.0

    def sample(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        co, si = math.cos(self.angle), math.sin(self.angle)
        k = 2.0 * math.pi / self.period
        s = np.sin(k * (co * x + si * y) + self.phase)
        if self.kind == "checker":
            s = s * np.sin(k * (co * y - si * x) + self.phase)
        elif self.kind != "stripes":
            raise PrunqError(f"PatternTexture.kind: expected 'stripes' or 'checker', got {self.kind!r}")
        t = 0.5 + 0.5 * np.tanh(self.sharpness * s) / math.tanh(self.sharpness)
        c0 = np.asarray(self.color0, dtype=np.float64).reshape(3, *([1] * t.ndim))
        c1 = np.asarray(self.color1, dtype=np.float64).reshape(3, *([1] * t.ndim))
        return (c0 + (c1 - c0) * t).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Surface:
    """A textured planar patch: disparity ``(a, b, c)`` meaning ``d(x, y) = a + b x + c y`` (needs b < 1)."""

    disparity: tuple[float, float, float]
    shape: Shape
    texture: Texture

    def __post_init__(self) -> None:
        if not self.disparity[1] < 1.0:
            raise PrunqError(f"Surface.disparity: slope b = {self.disparity[1]} must be < 1 (the right view folds)")


@dataclass(frozen=True)
class StereoScene:
    """A rendered pair: images (3, H, W) float32 in [0, 1], left-view ``disp`` (H, W) float32 (every
    pixel finite), ``nonoccluded`` (H, W) bool, and the right-view disparity ``disp_right`` (H, W)
    (``right[y, x] <-> left[y, x + disp_right]``)."""

    left: torch.Tensor
    right: torch.Tensor
    disp: torch.Tensor
    nonoccluded: torch.Tensor
    disp_right: torch.Tensor


def _zbuffer(
    z: np.ndarray, owner: np.ndarray, box: tuple[slice, slice], d: np.ndarray, inside: np.ndarray, s: int
) -> None:
    """Write surface ``s`` into ``z``/``owner`` over ``box`` where it is inside and strictly nearer."""
    zb = z[box]
    win = inside & (d > zb)
    np.copyto(zb, d, where=win)  # zb is a view: writes through
    np.copyto(owner[box], s, where=win)


def render_surfaces(surfaces: Sequence[Surface], height: int, width: int) -> StereoScene:
    """Render ``surfaces`` into both views with exact disparity and occlusion (see the module docstring).

    The surfaces must cover every left and right pixel (start with an :class:`Everywhere` background).

    >>> tex = PatternTexture("stripes", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), period=6.0)
    >>> scene = render_surfaces([Surface((4.0, 0.0, 0.0), Everywhere(), tex)], 8, 16)
    >>> bool(torch.allclose(scene.left[:, :, 4:], scene.right[:, :, :-4], atol=1e-6))  # right = left shifted by 4
    True
    """
    H, W = height, width
    z_l = np.full((H, W), -np.inf)
    z_r = np.full((H, W), -np.inf)
    own_l = np.full((H, W), -1, dtype=np.int32)
    own_r = np.full((H, W), -1, dtype=np.int32)
    rows: list[tuple[int, int] | None] = []

    # Pass 1: visibility in both views.
    for s, surf in enumerate(surfaces):
        a, b, c = surf.disparity
        x0, x1, y0, y1 = surf.shape.bbox()
        r0, r1 = max(0, math.ceil(max(y0, -1.0))), min(H - 1, math.floor(min(y1, float(H))))
        rows.append((r0, r1) if r0 <= r1 else None)
        if r0 > r1:
            continue
        ys = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]
        l0, l1 = max(0, math.ceil(max(x0, -1.0))), min(W - 1, math.floor(min(x1, float(W))))
        if l0 <= l1:
            xs = np.arange(l0, l1 + 1, dtype=np.float64)[None, :]
            box = (slice(r0, r1 + 1), slice(l0, l1 + 1))
            _zbuffer(z_l, own_l, box, a + b * xs + c * ys, surf.shape.inside(xs, ys), s)
        # Right columns the surface can reach: a bounded silhouette moves by its disparity range.
        q0, q1 = 0, W - 1
        if math.isfinite(x0) and math.isfinite(x1):
            corners = [a + b * x + c * y for x in (x0, x1) for y in (r0, r1)]
            q0, q1 = max(0, math.floor(x0 - max(corners)) - 1), min(W - 1, math.ceil(x1 - min(corners)) + 1)
        if q0 <= q1:
            xr = np.arange(q0, q1 + 1, dtype=np.float64)[None, :]
            xs = (xr + a + c * ys) / (1.0 - b)
            _zbuffer(z_r, own_r, (slice(r0, r1 + 1), slice(q0, q1 + 1)), xs - xr, surf.shape.inside(xs, ys), s)

    if (own_l < 0).any() or (own_r < 0).any():
        raise PrunqError("surfaces: some pixels are covered by no surface (add an Everywhere background)")

    # The disparity we return is float32; the left view is built from exactly that value so that a
    # consumer warping with the returned disparity reproduces it to float32 rounding.
    disp = z_l.astype(np.float32)
    d_flat = disp.ravel().astype(np.float64)
    own_l_flat, own_r_flat = own_l.ravel(), own_r.ravel()
    left = np.zeros((3, H * W), dtype=np.float32)
    right = np.zeros((3, H * W), dtype=np.float32)
    nonocc = np.zeros(H * W, dtype=bool)

    # Pass 2: colours. R_s is sampled once over the box of right columns both views need from surface
    # s. Gathers and scatters use flat indices and np.take / per-channel 1-D assignment: several times
    # faster than 2-D fancy indexing, which dominated the render time.
    for s, surf in enumerate(surfaces):
        if rows[s] is None:
            continue
        a, b, c = surf.disparity
        r0, r1 = rows[s]
        lo, hi = r0 * W, (r1 + 1) * W
        lf = np.flatnonzero(own_l_flat[lo:hi] == s) + lo  # flat left pixels of s
        rf = np.flatnonzero(own_r_flat[lo:hi] == s) + lo  # flat right pixels of s
        if lf.size == 0 and rf.size == 0:
            continue
        ly, lx = np.divmod(lf, W)
        ry, rx = np.divmod(rf, W)
        xr = lx - np.take(d_flat, lf)
        i = np.floor(xr).astype(np.int64)
        frac = (xr - i).astype(np.float32)
        cols = [i.min(), i.max() + 1] if lf.size else []
        cols += [rx.min(), rx.max()] if rf.size else []
        c0, c1 = int(min(cols)), int(max(cols))
        nc = c1 - c0 + 1
        ys = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]
        xr_box = np.arange(c0, c1 + 1, dtype=np.float64)[None, :]
        xs_box = (xr_box + a + c * ys) / (1.0 - b)
        colour = surf.texture.sample(xs_box, np.broadcast_to(ys, xs_box.shape)).reshape(3, -1)
        at_right = (ry - r0) * nc + (rx - c0)
        at_i = (ly - r0) * nc + (i - c0)
        for ch in range(3):
            right[ch][rf] = np.take(colour[ch], at_right)
            left[ch][lf] = (1.0 - frac) * np.take(colour[ch], at_i) + frac * np.take(colour[ch], at_i + 1)
        # Visible when the bracketing right pixels show s (the second one only matters if it has weight).
        row_start, whole = ly * W, frac == 0
        seen = (i >= 0) & ((i + 1 <= W - 1) | (whole & (i <= W - 1)))
        seen &= np.take(own_r_flat, row_start + np.clip(i, 0, W - 1)) == s
        seen &= whole | (np.take(own_r_flat, row_start + np.clip(i + 1, 0, W - 1)) == s)
        nonocc[lf] = seen

    return StereoScene(
        left=torch.from_numpy(np.clip(left, 0.0, 1.0, out=left).reshape(3, H, W)),
        right=torch.from_numpy(np.clip(right, 0.0, 1.0, out=right).reshape(3, H, W)),
        disp=torch.from_numpy(disp),
        nonoccluded=torch.from_numpy(nonocc.reshape(H, W)),
        disp_right=torch.from_numpy(z_r.astype(np.float32)),
    )
