"""Stereo pictures: shared colour scales, invalid pixels grey, every panel written as a PNG."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.image import imread

from prunq.tasks.stereo import viz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_render_middlebury_panels_share_scales(tmp_path):
    h, w = 12, 20
    left = torch.rand(3, h, w)
    gt = torch.full((h, w), 8.0)
    gt[0, 0] = float("inf")  # no ground truth here
    gt[1, 1] = 16.0  # the largest valid disparity sets the scale
    dense = gt.clone().nan_to_num(posinf=8.0)  # exact except where gt is missing
    comp = torch.full((h, w), 12.0)
    out = viz.render_middlebury(left, gt, {"dense": dense, "compressed": comp}, tmp_path, max_error=4.0)
    names = [n for _, n in out]
    assert names == ["middlebury.png", "middlebury_left.png", "middlebury_gt.png", "middlebury_dense.png",
                     "middlebury_dense_error.png", "middlebury_compressed.png", "middlebury_compressed_error.png"]
    for n in names:
        assert (tmp_path / n).read_bytes()[:8] == PNG_MAGIC
    assert "EPE 0.00 px" in out[4][0]

    viridis, magma = colormaps["viridis"], colormaps["magma"]
    gt_png = imread(tmp_path / "middlebury_gt.png")[..., :3]
    comp_png = imread(tmp_path / "middlebury_compressed.png")[..., :3]
    err_png = imread(tmp_path / "middlebury_compressed_error.png")[..., :3]
    # one disparity scale, 0..16: 8 px is the middle colour in the ground truth, 12 px three quarters
    assert np.allclose(gt_png[5, 5], viridis(0.5)[:3], atol=2 / 255)
    assert np.allclose(comp_png[5, 5], viridis(0.75)[:3], atol=2 / 255)
    # errors on their own scale (0..4 px): |12 - 8| = 4 is the top colour; no ground truth is grey
    assert np.allclose(err_png[5, 5], magma(1.0)[:3], atol=2 / 255)
    assert np.allclose(err_png[0, 0], viz.INVALID_RGB, atol=2 / 255)
    assert np.allclose(gt_png[0, 0], viz.INVALID_RGB, atol=2 / 255)


def test_render_previews_orders_stages_and_ignores_others(tmp_path):
    assert viz.render_previews({"dense.other": torch.zeros(2, 2)}, tmp_path) == []
