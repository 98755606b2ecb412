"""Stereo metrics on hand-made arrays, every expected number worked out in the comments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunq.core.errors import PrunqError
from prunq.tasks.stereo.metrics import METRIC_KEYS, StereoMeter, stereo_metrics

INF = float("inf")


def test_hand_worked_example_with_inf_and_zero_ground_truth():
    gt = np.array([[10.0, 20.0, 30.0], [40.0, INF, 0.0]])
    pred = np.array([[10.5, 21.5, 32.5], [44.0, 7.0, 9.0]])
    # Valid: the first four (inf and 0 have no ground truth). Errors 0.5, 1.5, 2.5, 4.0.
    m = stereo_metrics(pred, gt)
    assert list(m) == list(METRIC_KEYS)
    assert m["n_valid"] == 4
    assert m["epe"] == pytest.approx((0.5 + 1.5 + 2.5 + 4.0) / 4)  # 2.125
    assert m["bad1"] == 3 / 4  # 1.5, 2.5, 4.0 > 1
    assert m["bad2"] == 2 / 4  # 2.5, 4.0 > 2
    assert m["bad3"] == 1 / 4  # 4.0 > 3
    assert m["d1"] == 1 / 4  # 4.0 > 3 and 4.0 > 0.05 * 40 = 2


def test_d1_needs_both_the_absolute_and_the_relative_condition():
    # Error 4 px: at true disparity 100 the relative bound is 5 px -> not an outlier; at 50 it is 2.5 px -> outlier.
    assert stereo_metrics(np.array([[104.0]]), np.array([[100.0]]))["d1"] == 0.0
    assert stereo_metrics(np.array([[54.0]]), np.array([[50.0]]))["d1"] == 1.0
    # Error 2.9 px at true disparity 10 is over 5 % (0.5) but not over 3 px -> not an outlier.
    assert stereo_metrics(np.array([[12.9]]), np.array([[10.0]]))["d1"] == 0.0
    # Thresholds are strict: an error of exactly 3 px is not bad3.
    assert stereo_metrics(np.array([[13.0]]), np.array([[10.0]]))["bad3"] == 0.0


def test_explicit_valid_mask_replaces_the_positive_rule_but_never_admits_inf():
    gt = np.array([[0.0, 5.0, INF]])
    pred = np.array([[1.0, 5.0, 3.0]])
    # valid selects the 0-disparity pixel (error 1) and the 5 (error 0); the inf stays out.
    m = stereo_metrics(pred, gt, valid=np.array([[True, True, True]]))
    assert m["n_valid"] == 2 and m["epe"] == 0.5 and m["bad1"] == 0.0


def test_batches_are_pixel_weighted_and_torch_equals_numpy():
    gt = np.array([[[4.0, 4.0]], [[4.0, INF]]])  # (B=2, H=1, W=2): 3 valid pixels
    pred = np.array([[[4.0, 5.5]], [[10.0, 0.0]]])  # errors 0, 1.5, 6
    m = stereo_metrics(pred, gt)
    assert m["epe"] == pytest.approx(7.5 / 3) and m["bad1"] == pytest.approx(2 / 3)
    assert m["d1"] == pytest.approx(1 / 3)  # 6 > 3 and 6 > 0.2
    assert stereo_metrics(torch.tensor(pred, dtype=torch.float32), torch.tensor(gt, dtype=torch.float32)) == m


def test_nan_prediction_counts_as_an_infinite_error():
    m = stereo_metrics(np.array([[np.nan, 2.0]]), np.array([[2.0, 2.0]]))
    assert m["epe"] == INF and m["bad3"] == 0.5 and m["d1"] == 0.5


def test_no_valid_pixel_is_a_clear_error_for_one_call_but_not_for_a_meter():
    gt = np.array([[INF, 0.0, -3.0]])
    with pytest.raises(PrunqError, match="no valid ground-truth pixel"):
        stereo_metrics(np.zeros((1, 3)), gt)
    meter = StereoMeter()
    meter.update(np.zeros((1, 3)), gt)  # accepted, adds nothing
    with pytest.raises(PrunqError, match="StereoMeter"):
        meter.compute()
    meter.update(np.array([[3.0]]), np.array([[1.0]]))  # error 2
    assert meter.compute()["epe"] == 2.0 and meter.n_valid == 1


def test_meter_weights_pixels_not_images():
    meter = StereoMeter()
    meter.update(np.full((2, 2), 5.0), np.full((2, 2), 4.0))  # 4 pixels of error 1
    meter.update(torch.zeros(1, 2), torch.tensor([[4.0, INF]]))  # 1 pixel of error 4
    m = meter.compute()
    # Pixel-weighted: (4 * 1 + 4) / 5 = 1.6 (a mean of per-image means would say 2.5).
    assert m["epe"] == pytest.approx(1.6) and m["bad3"] == pytest.approx(1 / 5) and m["n_valid"] == 5
    meter.reset()
    assert meter.n_valid == 0


def test_shape_errors_name_the_argument():
    with pytest.raises(PrunqError, match="pred: shape"):
        stereo_metrics(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(PrunqError, match="valid: shape"):
        stereo_metrics(np.zeros((2, 3)), np.ones((2, 3)), valid=np.ones((3, 2), bool))
    with pytest.raises(PrunqError, match="gt: expected shape"):
        stereo_metrics(np.zeros((2, 2)), np.zeros(4))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.1, 100.0), st.floats(-20.0, 20.0)), min_size=1, max_size=30),
    st.integers(1, 5),
)
def test_meter_over_any_split_equals_one_call(pixels, parts):
    gt = np.array([g for g, _ in pixels])
    pred = gt + np.array([e for _, e in pixels])
    meter = StereoMeter()
    for idx in np.array_split(np.arange(len(gt)), parts):
        if idx.size:
            meter.update(pred[idx][None], gt[idx][None])
    whole = stereo_metrics(pred[None], gt[None])
    assert meter.compute() == pytest.approx(whole)
    assert 0.0 <= whole["d1"] <= whole["bad3"] <= whole["bad2"] <= whole["bad1"] <= 1.0
