"""Stereo disparity metrics (METHOD §6): ``epe``, ``d1``, ``bad1``, ``bad2``, ``bad3`` over valid pixels.

Conventions, shared by every stereo loader in prunq:

* ground truth is the disparity of the left image in pixels; a pixel is *valid* when its ground truth is
  finite and ``> 0`` (loaders write ``+inf`` where there is none). An explicit ``valid`` mask is
  combined with finiteness (``valid & isfinite(gt)``) so that an ``inf`` can never leak into a mean;
* a non-finite *prediction* (NaN, inf) at a valid pixel counts as an infinite error: ``epe`` becomes
  ``inf`` and the pixel is bad/d1. (NaN compares false, so propagating it would silently count the pixel
  as *good* in every threshold metric.)
* no valid pixel at all raises :class:`~prunq.core.errors.PrunqError` (there is no honest number to report);
  :class:`StereoMeter` accepts such images (they add nothing) and raises only if *nothing* was valid.

Averages are pixel-weighted: a batch (or a meter over many images) counts every valid pixel once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from prunq.core.errors import PrunqError

__all__ = ["METRIC_KEYS", "StereoMeter", "stereo_metrics"]

ArrayLike = np.ndarray | torch.Tensor

# The keys of the result, in report order.
METRIC_KEYS = ("epe", "d1", "bad1", "bad2", "bad3", "n_valid")
_BAD_THRESHOLDS = (1.0, 2.0, 3.0)
_D1_PX, _D1_REL = 3.0, 0.05  # KITTI 2015: outlier when error > 3 px AND > 5 % of the true disparity


def _as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu").numpy()
    a = np.asarray(x)
    if a.ndim not in (2, 3):
        raise PrunqError(f"{name}: expected shape (H, W) or (B, H, W), got {tuple(a.shape)}")
    return a


def _counts(pred: ArrayLike, gt: ArrayLike, valid: ArrayLike | None) -> np.ndarray:
    """Sums over valid pixels: [n, sum |err|, #d1, #bad1, #bad2, #bad3] (float64)."""
    p = _as_numpy(pred, "pred").astype(np.float64, copy=False)
    g = _as_numpy(gt, "gt").astype(np.float64, copy=False)
    if p.shape != g.shape:
        raise PrunqError(f"pred: shape {tuple(p.shape)} does not match gt shape {tuple(g.shape)}")
    mask = np.isfinite(g)
    if valid is None:
        mask &= g > 0
    else:
        v = _as_numpy(valid, "valid")
        if v.shape != g.shape:
            raise PrunqError(f"valid: shape {tuple(v.shape)} does not match gt shape {tuple(g.shape)}")
        mask &= v.astype(bool)
    g, p = g[mask], p[mask]
    err = np.abs(p - g)
    err[~np.isfinite(err)] = np.inf  # NaN prediction -> infinite error, never a "good" pixel
    out = np.empty(6, dtype=np.float64)
    out[0] = err.size
    out[1] = err.sum()
    out[2] = np.count_nonzero((err > _D1_PX) & (err > _D1_REL * g))
    out[3:] = [np.count_nonzero(err > t) for t in _BAD_THRESHOLDS]
    return out


def _finish(c: np.ndarray, what: str) -> dict[str, float]:
    n = c[0]
    if n == 0:
        raise PrunqError(f"{what}: no valid ground-truth pixel (finite and > 0, or inside `valid`)")
    return {
        "epe": float(c[1] / n),
        "d1": float(c[2] / n),
        "bad1": float(c[3] / n),
        "bad2": float(c[4] / n),
        "bad3": float(c[5] / n),
        "n_valid": float(n),
    }


def stereo_metrics(pred: ArrayLike, gt: ArrayLike, valid: ArrayLike | None = None) -> dict[str, float]:
    """``epe``, ``d1``, ``bad1..3`` (fractions in [0, 1]) and ``n_valid`` over valid ground-truth pixels.

    ``pred`` and ``gt`` are torch tensors or numpy arrays of shape (H, W) or (B, H, W); a batch is
    pixel-weighted. Raises PrunqError if no pixel is valid.

    >>> import numpy as np
    >>> gt = np.array([[10.0, 100.0, np.inf]])
    >>> m = stereo_metrics(np.array([[11.5, 104.0, 0.0]]), gt)  # errors 1.5 and 4; inf is skipped
    >>> m["epe"], m["bad1"], m["bad3"], m["d1"], m["n_valid"]
    (2.75, 1.0, 0.5, 0.0, 2.0)
    """
    return _finish(_counts(pred, gt, valid), "gt")


@dataclass
class StereoMeter:
    """Accumulates :func:`stereo_metrics` over images, pixel-weighted (sums, not a mean of means).

    >>> import numpy as np
    >>> meter = StereoMeter()
    >>> meter.update(np.full((2, 2), 5.0), np.full((2, 2), 4.0))    # 4 pixels, error 1
    >>> meter.update(np.zeros((1, 4)), np.array([[4.0, 4.0, 0.0, np.inf]]))  # 2 valid pixels, error 4
    >>> meter.compute()["epe"]  # (4 * 1 + 2 * 4) / 6
    2.0
    """

    _sums: np.ndarray = field(default_factory=lambda: np.zeros(6, dtype=np.float64), repr=False)

    def update(self, pred: ArrayLike, gt: ArrayLike, valid: ArrayLike | None = None) -> None:
        """Add one image or batch; images without any valid pixel are accepted and add nothing."""
        self._sums += _counts(pred, gt, valid)

    def compute(self) -> dict[str, float]:
        """The metrics over everything seen so far (PrunqError if no valid pixel was ever seen)."""
        return _finish(self._sums, "StereoMeter")

    def reset(self) -> None:
        """Forget everything seen."""
        self._sums[:] = 0.0

    @property
    def n_valid(self) -> int:
        """Valid pixels seen so far."""
        return int(self._sums[0])
