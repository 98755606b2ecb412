"""Synthetic scenes: exact geometry (left = right warped by the disparity), occlusion, determinism, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from prunq.core.errors import PrunqError
from prunq.tasks.stereo.synthetic import SyntheticStereo, photometric_jitter, render, render_scene

from tests.tasks.stereo.test_surfaces import _warp_right  # the independent check of the rendering geometry


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 11])
def test_nonoccluded_left_pixels_match_the_warped_right_view(seed):
    s = render(seed, 64, 128, 24.0)
    left, right, disp, ok = s.left.numpy(), s.right.numpy(), s.disp.numpy(), s.nonoccluded.numpy()
    err = np.abs(_warp_right(right, disp) - left).max(axis=0)
    assert ok.mean() > 0.6  # the property is checked on most of the image, not a sliver
    assert err[ok].max() < 1e-6
    # ...and it is not vacuous: the occluded pixels do not match in general.
    assert err[~ok].max() > 1e-2


def test_geometry_holds_at_training_size():
    s = render((5, 0, 1), 256, 512, 64.0)
    ok = s.nonoccluded.numpy()
    err = np.abs(_warp_right(s.right.numpy(), s.disp.numpy()) - s.left.numpy()).max(axis=0)
    assert err[ok].max() < 1e-6


def test_right_disparity_is_consistent_with_the_left():
    # A visible left point lands between two right pixels of the same plane, where the right-view
    # disparity is affine in x: interpolating it at x - d gives back d.
    s = render(4, 64, 128, 24.0)
    dl, dr = s.disp.numpy().astype(np.float64), s.disp_right.numpy().astype(np.float64)
    ok = s.nonoccluded.numpy()
    assert np.abs(_warp_right(dr[None], dl)[0] - dl)[ok].max() < 2e-5


def test_same_seed_same_scene_other_seed_other_scene():
    a, b, c = render(3, 48, 96, 16.0), render(3, 48, 96, 16.0), render(4, 48, 96, 16.0)
    for name in ("left", "right", "disp", "nonoccluded", "disp_right"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.left, c.left) and not torch.equal(a.disp, c.disp)


def test_outputs_have_the_documented_types_and_disparity_range():
    lows, highs = [], []
    for seed in range(6):
        left, right, disp = render_scene(seed, 64, 128, 32.0, min_disp=2.0)
        assert left.shape == right.shape == (3, 64, 128) and disp.shape == (64, 128)
        assert left.dtype == right.dtype == disp.dtype == torch.float32
        assert 0.0 <= left.min() and left.max() <= 1.0 and 0.0 <= right.min() and right.max() <= 1.0
        assert 2.0 <= disp.min() and disp.max() <= 32.0
        lows.append(disp.min().item())
        highs.append(disp.max().item())
    assert min(lows) < 8.0 and max(highs) > 24.0  # the range is actually used, near and far


def test_jitter_changes_pixels_not_geometry():
    plain, jit = render(2, 48, 96, 16.0), render(2, 48, 96, 16.0, jitter=True)
    assert torch.equal(plain.disp, jit.disp) and torch.equal(plain.nonoccluded, jit.nonoccluded)
    assert not torch.equal(plain.left, jit.left) and not torch.equal(plain.right, jit.right)
    assert 0.0 <= jit.left.min() and jit.left.max() <= 1.0
    assert torch.equal(jit.left, render(2, 48, 96, 16.0, jitter=True).left)  # still deterministic
    out = photometric_jitter(torch.zeros(3, 2, 2), np.random.default_rng(1))
    assert out.shape == (3, 2, 2) and 0.0 <= out.min() and out.max() <= 1.0


def test_dataset_splits_are_disjoint_and_deterministic():
    train = SyntheticStereo("train", n=3, height=32, width=64, max_disp=12.0, seed=5)
    val = SyntheticStereo("val", n=3, height=32, width=64, max_disp=12.0, seed=5)
    assert len(train) == 3
    assert {train.scene_seed(i) for i in range(3)}.isdisjoint(val.scene_seed(i) for i in range(3))
    assert not torch.equal(train[0][0], val[0][0])
    assert all(torch.equal(x, y) for x, y in zip(train[1], train[-2]))
    more = SyntheticStereo("train", n=10, height=32, width=64, max_disp=12.0, seed=5)
    assert torch.equal(more[2][2], train[2][2])  # growing n keeps earlier items
    with pytest.raises(IndexError):
        train[3]
    loader = torch.utils.data.DataLoader(train, batch_size=2)
    left, _right, disp = next(iter(loader))
    assert left.shape == (2, 3, 32, 64) and disp.shape == (2, 32, 64)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"split": "dev"}, "split"),
        ({"n": 0}, "n"),
        ({"max_disp": 40.0}, "max_disp"),
        ({"max_disp": 0.5}, "max_disp"),
        ({"height": 2}, "height"),
    ],
)
def test_dataset_refuses_bad_arguments(kwargs, field):
    args = {"split": "train", "n": 2, "height": 32, "width": 64, "max_disp": 12.0} | kwargs
    with pytest.raises(PrunqError, match=field):
        SyntheticStereo(**args)


def test_render_refuses_negative_seeds():
    with pytest.raises(PrunqError, match="seed"):
        render(-1, 32, 64, 12.0)
    with pytest.raises(PrunqError, match="seed"):
        render((0, -2), 32, 64, 12.0)


def test_render_is_fast_enough_to_feed_training():
    # Budget from the brief: 256 x 512 well under 0.1 s on one core. The bound here is loose (shared CI
    # machines); a per-pixel Python loop would take seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        render(0, 256, 512, 64.0)  # loads the photos once
        times = []
        for seed in range(3):
            t0 = time.perf_counter()
            render(seed, 256, 512, 64.0)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    assert sorted(times)[1] < 0.25
