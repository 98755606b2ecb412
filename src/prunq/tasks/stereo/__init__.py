"""Stereo depth estimation (METHOD §6): metrics, synthetic training scenes and on-disk data sets.

Conventions shared by every module here: images are float32 (3, H, W) in [0, 1]; disparity is that of the
LEFT image in pixels, float32 (H, W), with ``left[y, x] <-> right[y, x - d]``; a pixel without ground
truth holds ``+inf`` (so "valid" is simply ``isfinite(disp)``, and the metrics' default of "finite and
> 0" agrees with it).
"""

from __future__ import annotations

from prunq.tasks.stereo.datasets import Kitti2015, SceneFlow, middlebury_motorcycle, read_pfm, write_pfm
from prunq.tasks.stereo.metrics import StereoMeter, stereo_metrics
from prunq.tasks.stereo.surfaces import StereoScene, render_surfaces
from prunq.tasks.stereo.synthetic import SyntheticStereo, render, render_scene

__all__ = [
    "Kitti2015",
    "SceneFlow",
    "StereoMeter",
    "StereoScene",
    "SyntheticStereo",
    "middlebury_motorcycle",
    "read_pfm",
    "render",
    "render_scene",
    "render_surfaces",
    "stereo_metrics",
    "write_pfm",
]
