"""Exact two-view rendering of planar surfaces (prunq.tasks.stereo.surfaces): scenes built by hand, with
their disparity and occlusion worked out, and the shapes and textures on hand points."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prunq.core.errors import PrunqError
from prunq.tasks.stereo.surfaces import (
    Ellipse,
    Everywhere,
    ImageTexture,
    PatternTexture,
    Polygon,
    Surface,
    render_surfaces,
)


def _warp_right(right: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Right view bilinearly sampled at (y, x - disp[y, x]) -- written independently of the renderer."""
    _, H, W = right.shape
    xr = np.arange(W, dtype=np.float64)[None, :] - disp.astype(np.float64)
    i = np.floor(xr).astype(np.int64)
    f = xr - i
    y = np.arange(H)[:, None]
    r0 = right[:, y, np.clip(i, 0, W - 1)]
    r1 = right[:, y, np.clip(i + 1, 0, W - 1)]
    return (1.0 - f) * r0 + f * r1


def _stripes(c0: float, c1: float, period: float) -> PatternTexture:
    return PatternTexture("stripes", (c0, c0, c0), (c1, c1, c1), period=period, angle=0.3)


def test_a_near_square_hides_the_background_behind_it():
    # Background at d = 4, a square over x in [20, 40], y in [4, 12] at d = 20, listed FIRST so that
    # list order cannot be what decides visibility (the z-buffer must).
    H, W = 16, 64
    square = Polygon(((19.5, 3.5), (40.5, 3.5), (40.5, 12.5), (19.5, 12.5)))
    s = render_surfaces(
        [
            Surface((20.0, 0.0, 0.0), square, _stripes(0.0, 0.4, 5.0)),
            Surface((4.0, 0.0, 0.0), Everywhere(), _stripes(0.6, 1.0, 7.0)),
        ],
        H,
        W,
    )
    left, right, disp, ok = s.left.numpy(), s.right.numpy(), s.disp.numpy(), s.nonoccluded.numpy()
    in_sq = np.zeros((H, W), dtype=bool)
    in_sq[4:13, 20:41] = True
    assert np.array_equal(disp, np.where(in_sq, 20.0, 4.0).astype(np.float32))
    # The square's right image is its left image moved by 20 px; its colours are the dark ones.
    assert np.allclose(right[:, 4:13, 0:21], left[:, 4:13, 20:41], atol=1e-6)
    assert right[:, 4:13, 0:21].max() <= 0.4 + 1e-6 and right[:, 4:13, 21:].min() >= 0.6 - 1e-6
    # Expected occlusion, worked out: background pixel x maps to right column x - 4; the square covers
    # right columns 0..20 in rows 4..12, so background x in [4, 19] there is hidden (x in [20, 24]
    # is the square itself); x < 4 falls off the right image in every row.
    expect = np.ones((H, W), dtype=bool)
    expect[:, :4] = False
    expect[4:13, 4:20] = False
    assert np.array_equal(ok, expect)
    # The visible background really is the right view warped back.
    assert np.abs(_warp_right(right, disp) - left).max(axis=0)[ok].max() < 1e-6


def test_slanted_surfaces_and_image_textures_render_exactly():
    # Sub-pixel, slanted planes with an ellipse in front; an image texture for the background.
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.uniform(0, 1, (3, 20, 20)).astype(np.float32))
    bg = Surface((3.0, 0.02, 0.05), Everywhere(), ImageTexture(img, (0.4, 0.1, 0.0, -0.1, 0.4, 0.0)))
    fg = Surface((12.3, -0.1, 0.03), Ellipse(40.0, 16.0, 14.0, 9.0, 0.5), _stripes(0.1, 0.9, 4.5))
    s = render_surfaces([bg, fg], 32, 80)
    ok = s.nonoccluded.numpy()
    err = np.abs(_warp_right(s.right.numpy(), s.disp.numpy()) - s.left.numpy()).max(axis=0)
    assert err[ok].max() < 1e-6
    assert ok.mean() > 0.7
    assert s.disp[16, 40].item() == pytest.approx(12.3 - 0.1 * 40 + 0.03 * 16, abs=1e-5)


def test_polygon_even_odd_rule_on_hand_points():
    tri = Polygon(((0.0, 0.0), (10.0, 0.0), (0.0, 10.0)))
    x = np.array([1.0, 6.0, 4.0, -1.0, 4.9])
    y = np.array([1.0, 6.0, 4.0, 1.0, 5.0])
    assert tri.inside(x, y).tolist() == [True, False, True, False, True]  # x + y < 10 inside


def test_uncovered_pixels_and_folding_planes_are_refused():
    with pytest.raises(PrunqError, match="covered by no surface"):
        render_surfaces([Surface((5.0, 0.0, 0.0), Ellipse(8, 8, 3, 3), _stripes(0, 1, 4))], 16, 32)
    with pytest.raises(PrunqError, match="disparity"):
        Surface((5.0, 1.0, 0.0), Everywhere(), _stripes(0, 1, 4))


def test_right_view_disparity_and_occlusion_of_a_small_square():
    # Background d = 2; a square over left x in [10, 14], y in [2, 4] at d = 6. In the right view the square
    # is at x - 6, columns 4..8 (rows 2..4); every other right pixel sees the background at d = 2.
    H, W = 8, 24
    square = Polygon(((9.5, 1.5), (14.5, 1.5), (14.5, 4.5), (9.5, 4.5)))
    s = render_surfaces(
        [
            Surface((2.0, 0.0, 0.0), Everywhere(), _stripes(0.5, 1.0, 5.0)),
            Surface((6.0, 0.0, 0.0), square, _stripes(0.0, 0.3, 3.0)),
        ],
        H, W,
    )  # fmt: skip
    left_sq, right_sq = np.zeros((H, W), dtype=bool), np.zeros((H, W), dtype=bool)
    left_sq[2:5, 10:15] = True
    right_sq[2:5, 4:9] = True
    assert np.array_equal(s.disp.numpy(), np.where(left_sq, 6.0, 2.0).astype(np.float32))
    assert np.array_equal(s.disp_right.numpy(), np.where(right_sq, 6.0, 2.0).astype(np.float32))
    # background x -> right column x - 2: off the image for x < 2, behind the square for x in 6..9 (rows 2..4)
    expect = np.ones((H, W), dtype=bool)
    expect[:, :2] = False
    expect[2:5, 6:10] = False
    assert np.array_equal(s.nonoccluded.numpy(), expect)


def test_equal_disparities_go_to_the_earlier_surface():
    first = _stripes(0.0, 1.0, 4.0)
    flat = PatternTexture("stripes", (0.7, 0.7, 0.7), (0.7, 0.7, 0.7), period=4.0)  # one colour
    alone = render_surfaces([Surface((3.0, 0.0, 0.0), Everywhere(), first)], 6, 16)
    both = render_surfaces(
        [Surface((3.0, 0.0, 0.0), Everywhere(), first), Surface((3.0, 0.0, 0.0), Everywhere(), flat)], 6, 16
    )
    assert torch.equal(both.left, alone.left) and torch.equal(both.right, alone.right)
    assert not torch.equal(both.left, torch.full_like(both.left, 0.7))


def test_shapes_on_hand_points():
    # Rotated by 90 degrees, the ellipse's long axis (rx = 4) lies along y: u = dy / 4, v = -dx / 2.
    e = Ellipse(0.0, 0.0, 4.0, 2.0, math.pi / 2)
    x = np.array([0.0, 1.9, 3.0, 0.0])
    y = np.array([3.9, 0.0, 0.0, 4.1])
    assert e.inside(x, y).tolist() == [True, True, False, False]
    assert e.bbox() == pytest.approx((-2.0, 2.0, -4.0, 4.0))
    assert Ellipse(5.0, 6.0, 3.0, 1.0).bbox() == (2.0, 8.0, 5.0, 7.0)
    assert Polygon(((0.0, 0.0), (10.0, 0.0), (0.0, 10.0))).bbox() == (0.0, 10.0, 0.0, 10.0)
    everywhere = Everywhere()
    assert everywhere.inside(np.zeros((2, 1)), np.zeros((1, 3))).tolist() == [[True] * 3] * 2  # broadcast
    assert everywhere.bbox() == (-math.inf, math.inf, -math.inf, math.inf)


def test_pattern_textures_on_hand_points():
    # stripes at angle 0: t = 0.5 + 0.5 tanh(3 sin(2 pi x / 8)) / tanh(3); sin = 1 at x = 2 -> color1,
    # -1 at x = 6 -> color0, 0 at x = 0 -> the midpoint. The checker multiplies by sin(2 pi y / 8).
    stripes = PatternTexture("stripes", (0.0, 0.0, 0.0), (1.0, 0.5, 0.0), period=8.0)
    out = stripes.sample(np.array([[2.0, 6.0, 0.0]]), np.array([[5.0, 5.0, 5.0]]))
    assert out.shape == (3, 1, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], [[1.0, 0.0, 0.5], [0.5, 0.0, 0.25], [0.0, 0.0, 0.0]], atol=1e-6)
    checker = PatternTexture("checker", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), period=8.0)
    np.testing.assert_allclose(checker.sample(np.array([2.0, 2.0]), np.array([2.0, 6.0]))[0], [1.0, 0.0], atol=1e-6)
    with pytest.raises(PrunqError, match="PatternTexture.kind"):
        PatternTexture("dots", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), period=8.0).sample(np.zeros(1), np.zeros(1))


def test_image_texture_samples_pixel_centres_and_mirrors_outside():
    img = torch.arange(18, dtype=torch.float32).reshape(3, 2, 3) / 17  # (3, h = 2, w = 3)
    tex = ImageTexture(img, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))  # u = x, v = y
    row = img[:, 1].numpy()

    def at(xs: list[float]) -> np.ndarray:  # row y = 1 at the given x
        return tex.sample(np.array(xs), np.ones(len(xs)))

    np.testing.assert_allclose(at([0.0, 1.0, 2.0]), row, atol=1e-6)  # pixel centres: the pixels themselves
    np.testing.assert_allclose(at([0.5])[:, 0], (row[:, 0] + row[:, 1]) / 2, atol=1e-6)  # bilinear between
    # mirrored about the image edges (-0.5 and w - 0.5): x = -1 reads column 0, x = 3 reads column 2
    np.testing.assert_allclose(at([-1.0, 3.0]), row[:, [0, 2]], atol=1e-6)
    dim = ImageTexture(img, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), gain=(1.0, 0.5, 0.0))
    dimmed = dim.sample(np.array([1.0]), np.array([1.0]))[:, 0]
    np.testing.assert_allclose(dimmed, row[:, 1] * [1.0, 0.5, 0.0], atol=1e-6)
