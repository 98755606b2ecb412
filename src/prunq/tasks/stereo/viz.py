"""Pictures of stereo predictions for reports: the Middlebury motorcycle pair, its ground truth, the dense
and the compressed model's disparity and their error maps, on shared colour scales.

Disparity maps share one scale (0 to the largest valid ground truth, ``viridis``); error maps share another
(0 to ``max_error`` px, ``magma``); pixels without ground truth are drawn grey in every map but the image.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = ["render_middlebury", "render_previews"]

INVALID_RGB = (0.55, 0.55, 0.55)


def _colour(values: np.ndarray, valid: np.ndarray, vmax: float, cmap: str) -> np.ndarray:
    """(H, W) values -> (H, W, 3) RGB floats in [0, 1] on [0, vmax]; invalid pixels grey."""
    from matplotlib import colormaps

    rgb = colormaps[cmap](np.clip(values / vmax, 0.0, 1.0))[..., :3]
    rgb[~valid] = INVALID_RGB
    return rgb


def render_middlebury(
    left: torch.Tensor,
    gt: torch.Tensor,
    predictions: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    max_error: float = 10.0,
    prefix: str = "middlebury",
) -> list[tuple[str, str]]:
    """Write ``{prefix}.png`` (all panels, two colour bars) and one PNG per panel into ``out_dir``.

    ``left`` is (3, H, W) in [0, 1], ``gt`` (H, W) with ``inf`` where there is no ground truth, and
    ``predictions`` maps a label (``"dense"``, ``"compressed"``) to an (H, W) disparity. Returns
    ``(caption, file name)`` pairs, the composite first.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img = left.permute(1, 2, 0).clamp(0, 1).numpy()
    g = gt.numpy()
    valid = np.isfinite(g)
    vmax = float(g[valid].max()) if valid.any() else 1.0
    everywhere = np.ones_like(valid)
    panels: list[tuple[str, str, np.ndarray]] = [
        ("left image", f"{prefix}_left.png", img),
        ("ground truth", f"{prefix}_gt.png", _colour(np.where(valid, g, 0), valid, vmax, "viridis")),
    ]
    for label, pred in predictions.items():
        p = pred.float().numpy()
        epe = float(np.abs(p - g)[valid].mean()) if valid.any() else float("nan")
        panels.append((f"{label} prediction", f"{prefix}_{label}.png", _colour(p, everywhere, vmax, "viridis")))
        err = np.where(valid, np.abs(p - g), 0)
        panels.append(
            (f"{label} error (EPE {epe:.2f} px)", f"{prefix}_{label}_error.png", _colour(err, valid, max_error, "magma"))
        )
    for _, name, rgb in panels:
        plt.imsave(out_dir / name, rgb)

    cols = 2
    rows = (len(panels) + cols - 1) // cols
    h, w = img.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(2 * 4.2, rows * 4.2 * h / w + 0.4), squeeze=False)
    for ax, (title, _, rgb) in zip(axes.flat, panels):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.86, top=0.95, bottom=0.02, wspace=0.03, hspace=0.15)
    for cmap, top, label, hi in (("viridis", 0.55, "disparity (px)", vmax), ("magma", 0.05, "error (px)", max_error)):
        cax = fig.add_axes((0.89, top, 0.02, 0.38))
        fig.colorbar(plt.cm.ScalarMappable(Normalize(0, hi), cmap), cax=cax).set_label(label, fontsize=8)
    path = out_dir / f"{prefix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    caption = "Middlebury motorcycle: " + ", ".join(t for t, _, _ in panels)
    return [(caption, path.name)] + [(t, n) for t, n, _ in panels]


def render_previews(previews: Mapping[str, torch.Tensor], out_dir: str | Path) -> list[tuple[str, str]]:
    """Draw the ``"<stage>.middlebury"`` previews a stereo run keeps (see ``StereoTask.previews``)."""
    found = {key.split(".", 1)[0]: v for key, v in previews.items() if key.endswith(".middlebury")}
    order = ["dense", "pruned", "compressed"]
    preds = {k: found[k] for k in sorted(found, key=lambda k: (order.index(k) if k in order else len(order), k))}
    if not preds:
        return []
    from prunq.tasks.stereo.datasets import middlebury_motorcycle

    left, _, gt = middlebury_motorcycle()
    return render_middlebury(left, gt, preds, out_dir)
