"""StereoNet: METHOD §6 shapes for any H, W, gradients to every conv, fx tracing and BN folding, the zoo."""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.tasks import build_model
from prunq.tasks.stereo import models
from prunq.tasks.stereo.models import StereoNet, build, group_correlation

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return StereoNet()


@pytest.mark.parametrize("size", [(37, 53), (100, 131), (32, 64)])
def test_output_shape_any_size(net, size):
    torch.manual_seed(1)
    left, right = torch.rand(2, 3, *size), torch.rand(2, 3, *size)
    out = net(left, right)
    assert out.shape == (2, *size)
    assert torch.isfinite(out).all() and (out >= 0).all()


def test_small_and_compressible():
    model = StereoNet()
    assert sum(p.numel() for p in model.parameters()) < 300_000
    # Only conv / BN / ReLU modules carry state; every learnable weight is in a conv or a BN.
    leaves = [m for m in model.modules() if not list(m.children())]
    assert all(isinstance(m, (*_CONVS, nn.BatchNorm2d, nn.ReLU)) for m in leaves)
    assert all(not m.inplace for m in leaves if isinstance(m, nn.ReLU))


def test_gradients_reach_every_conv():
    torch.manual_seed(2)
    model = StereoNet()
    left = torch.rand(2, 3, 40, 72)
    right = torch.roll(left, -3, dims=-1)  # a plausible pair keeps the output ReLU mostly active
    model(left, right).mean().backward()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, _CONVS)}
    assert len(convs) == 13
    for name, m in convs.items():
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, name


def test_fx_traces_and_matches(net):
    gm = torch.fx.symbolic_trace(net)
    left, right = torch.rand(1, 3, 37, 53), torch.rand(1, 3, 37, 53)
    net.eval()
    try:
        torch.testing.assert_close(gm(left, right), net(left, right))
    finally:
        net.train()
    # every module is called once (the shared feature extractor runs on both views in one batch)
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert len(called) == len(set(called))


def test_bn_folding_finds_every_pair(net):
    from prunq.quant.fold import find_conv_bn_pairs

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to Sequential adjacency: fx traced
        pairs = find_conv_bn_pairs(net)
    assert len(pairs) == 11
    assert ("features.block1.conv", "features.block1.bn") in pairs


def test_group_correlation_matches_definition():
    torch.manual_seed(3)
    l, r = torch.rand(2, 8, 5, 9), torch.rand(2, 8, 5, 9)
    cost = group_correlation(l, r, 4, 12)  # more disparities than columns
    assert cost.shape == (2, 48, 5, 9)
    d, g, x = 3, 1, 6
    expect = (l[:, 2 * g : 2 * g + 2, :, x] * r[:, 2 * g : 2 * g + 2, :, x - d]).mean(1)
    torch.testing.assert_close(cost[:, d * 4 + g, :, x], expect)
    assert (cost[:, d * 4 : (d + 1) * 4, :, :d] == 0).all()
    assert (cost[:, 10 * 4 :] == 0).all()


def test_recovers_a_constant_shift_direction():
    """Left-view reference: with right = left shifted so that left[x] = right[x - d], correlation at d wins."""
    torch.manual_seed(4)
    f = torch.rand(1, 8, 6, 30)
    left = f[..., 5:25]
    right = f[..., 5 + 3 : 25 + 3]  # right[x] = f[x + 8] -> left[x] = f[x + 5] = right[x - 3]
    cost = group_correlation(left, right, 1, 6)[0, :, :, 10:]
    assert int(cost.mean((1, 2)).argmax()) == 3


def test_width_and_max_disp():
    m = StereoNet(width=0.5, max_disp=32)
    assert m.n_disp == 8 and m.features.block1.conv.out_channels == 8
    assert m(torch.rand(1, 3, 24, 40), torch.rand(1, 3, 24, 40)).shape == (1, 24, 40)
    with pytest.raises(PrunqError):
        StereoNet(width=0)
    with pytest.raises(PrunqError):
        StereoNet(max_disp=2)


def test_zoo_and_registry():
    assert isinstance(build("stereo_net", width=0.5), StereoNet)
    assert isinstance(build_model("stereo", "stereo_net", max_disp=32), StereoNet)
    with pytest.raises(PrunqError, match="unknown model"):
        build("nope")
    with pytest.raises(PrunqError, match="does not take"):
        build("stereo_net", depth=3)


def test_docstring_examples():
    result = doctest.testmod(models, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
