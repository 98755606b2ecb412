"""Stereo model zoo: ``StereoNet``, a compact CPU-trainable disparity network (METHOD §6 contract).

``model(left, right)`` takes float images in [0, 1] of shape (B, 3, H, W) -- any H, W -- and returns the
disparity of the LEFT image in pixels, shape (B, H, W), with ``left[y, x] <-> right[y, x - d]``.

Layout, so that every layer can be pruned and quantized:

* every learnable layer is an ``nn.Conv2d`` / ``nn.ConvTranspose2d``; each conv (except the two output
  convs) sits in an ``nn.Sequential(conv, bn, relu)`` with named entries, and every activation is its
  own non-inplace ``nn.ReLU`` module;
* the feature extractor is *shared* by both views but runs ONCE on ``cat([left, right])`` along the
  batch, so each module is called once per forward (BN folding pairs a conv with its BN only then);
* the parameter-free tensor plumbing (padding, cost volume, cropping) lives in functions registered
  with ``torch.fx.wrap``, so ``torch.fx.symbolic_trace`` records them as leaves and the model traces.

>>> model = StereoNet()
>>> model(torch.rand(2, 3, 37, 53), torch.rand(2, 3, 37, 53)).shape
torch.Size([2, 37, 53])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from prunq.core.errors import PrunqError
from prunq.tasks.base import build_from_zoo

__all__ = ["MODELS", "StereoNet", "build", "group_correlation"]

STRIDE = 8  # total stride: features at 1/4, one more 2x level inside the aggregation hourglass
FEATURE_STRIDE = 4
#: Ranges of StereoNet's arguments (the parameter count is bounded as well, by ``build_from_zoo``): the
#: cost volume has ``groups * max_disp / 4`` channels at 1/4 resolution and is built in a loop over
#: ``max_disp / 4`` disparities.
MAX_WIDTH = 1000.0
MAX_DISP = 2048
MAX_GROUPS = 256


def _scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, round(channels * width))


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom and right of ``x`` (B, C, H, W) up to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


def _crop_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (B, 1, H', W') cropped to ``ref``'s spatial size and squeezed to (B, H, W)."""
    h, w = ref.shape[-2:]
    return x[:, 0, :h, :w]


def _split_views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo ``cat([left, right], 0)``: the two halves of the batch."""
    b = x.shape[0] // 2
    return x[:b], x[b:]


def group_correlation(left: torch.Tensor, right: torch.Tensor, groups: int, n_disp: int) -> torch.Tensor:
    """Group-wise correlation cost volume, flattened to 2-D channels: (B, n_disp * groups, h, w).

    Channel ``d * groups + g`` at ``(y, x)`` is the mean over group ``g``'s channels of
    ``left[:, c, y, x] * right[:, c, y, x - d]`` (0 where ``x - d < 0``).

    >>> l = torch.arange(4.0).view(1, 1, 1, 4)
    >>> group_correlation(l, l, 1, 2)[0, :, 0]  # d = 0: l*l; d = 1: l[x] * l[x - 1]
    tensor([[0., 1., 4., 9.],
            [0., 0., 2., 6.]])
    """
    b, c, h, w = left.shape
    if c % groups:
        raise PrunqError(f"group_correlation: {c} channels do not split into {groups} groups")
    costs = []
    for d in range(n_disp):
        if d >= w:  # no overlap at all
            costs.append(left.new_zeros(b, groups, h, w))
            continue
        prod = left[..., d:] * right[..., : w - d]
        cost = prod.view(b, groups, c // groups, h, w - d).mean(2)
        costs.append(F.pad(cost, (d, 0)) if d else cost)  # pad the G-channel result, not the C-channel input
    return torch.cat(costs, dim=1)


def _soft_argmin(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Expected disparity under ``softmax(logits)`` over dim 1: (B, 1, h, w)."""
    return (F.softmax(logits, dim=1) * values).sum(dim=1, keepdim=True)


def _upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear upsampling by an integer factor (half-pixel centres)."""
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


for _fn in ("_pad_to_multiple", "_crop_like", "_split_views", "group_correlation", "_soft_argmin", "_upsample"):
    torch.fx.wrap(_fn)


def _cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """``conv`` (3x3, no bias) -> ``bn`` -> ``relu`` as a named Sequential."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(),
        )
    )


def _up_br(cin: int, cout: int) -> nn.Sequential:
    """2x ``conv`` (ConvTranspose 4x4, stride 2, no bias) -> ``bn`` -> ``relu``."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(),
        )
    )


class StereoNet(nn.Module):
    """Shared 1/4-resolution features, group-wise correlation, 2-D hourglass aggregation, soft-argmin,
    bilinear upsampling and a residual refinement on the left image.

    ``width`` scales every channel count (16/32/32 features, 48/64 aggregation at 1.0); ``max_disp`` is
    the largest disparity (input pixels) the cost volume covers, ``ceil(max_disp / 4)`` levels at 1/4
    resolution. About 0.24 M parameters at width 1.
    """

    def __init__(self, width: float = 1.0, max_disp: int = 64, groups: int = 8) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= MAX_WIDTH:
            raise PrunqError(f"model.kwargs.width: must be a positive number up to {MAX_WIDTH:g}, got {width!r}")
        if isinstance(max_disp, bool) or not isinstance(max_disp, int) or not FEATURE_STRIDE <= max_disp <= MAX_DISP:
            raise PrunqError(f"model.kwargs.max_disp: must be an integer in [{FEATURE_STRIDE}, {MAX_DISP}], got {max_disp!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= MAX_GROUPS:
            raise PrunqError(f"model.kwargs.groups: must be an integer in [1, {MAX_GROUPS}], got {groups!r}")
        self.max_disp = max_disp
        self.n_disp = math.ceil(max_disp / FEATURE_STRIDE)
        self.groups = groups
        f1, f2 = _scaled(16, width), _scaled(32, width)
        f3 = max(groups, _scaled(32, width) // groups * groups)  # a multiple of `groups`
        a1, a2, r = _scaled(48, width), _scaled(64, width), _scaled(16, width)

        self.features = nn.Sequential(
            OrderedDict(
                block1=_cbr(3, f1, stride=2),
                block2=_cbr(f1, f2, stride=2),
                block3=_cbr(f2, f3),
                block4=_cbr(f3, f3),
            )
        )
        self.agg_in = nn.Sequential(OrderedDict(block1=_cbr(groups * self.n_disp + f3, a1), block2=_cbr(a1, a1)))
        self.agg_down = nn.Sequential(OrderedDict(block1=_cbr(a1, a2, stride=2), block2=_cbr(a2, a2)))
        self.agg_up = _up_br(a2, a1)
        self.agg_out = nn.Conv2d(a1, self.n_disp, 3, padding=1)
        self.refine = nn.Sequential(
            OrderedDict(block1=_cbr(4, r), block2=_cbr(r, r, dilation=2), conv=nn.Conv2d(r, 1, 3, padding=1))
        )
        self.out_relu = nn.ReLU()
        values = torch.arange(self.n_disp, dtype=torch.float32) * FEATURE_STRIDE
        self.register_buffer("disp_values", values.view(1, -1, 1, 1), persistent=False)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) x 2 in [0, 1] -> left disparity (B, H, W) in input pixels, >= 0."""
        left_p = _pad_to_multiple(left, STRIDE)
        right_p = _pad_to_multiple(right, STRIDE)
        feats = self.features(torch.cat([left_p, right_p], dim=0))  # one call: both views, shared weights
        fl, fr = _split_views(feats)
        cost = group_correlation(fl, fr, self.groups, self.n_disp)
        x = self.agg_in(torch.cat([cost, fl], dim=1))
        x = self.agg_up(self.agg_down(x)) + x
        coarse = _soft_argmin(self.agg_out(x), self.disp_values)  # (B, 1, H/4, W/4), input pixels
        disp = _upsample(coarse, FEATURE_STRIDE) * FEATURE_STRIDE
        residual = self.refine(torch.cat([disp / self.max_disp, left_p], dim=1))
        return _crop_like(self.out_relu(disp + residual), left)


MODELS: dict[str, Callable[..., nn.Module]] = {"stereo_net": StereoNet}


def build(name: str, **kwargs: object) -> nn.Module:
    """A fresh model from :data:`MODELS`; unknown names or arguments raise :class:`PrunqError`.

    >>> build("stereo_net", max_disp=32).n_disp
    8
    """
    return build_from_zoo(MODELS, name, **kwargs)
