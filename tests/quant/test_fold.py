"""BatchNorm folding: pair detection (fx and the Sequential fallback) and exactness of the fold."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.prune.masks import attach_mask, set_mask, zero_pruned_
from prunq.quant import QuantConfig, find_conv_bn_pairs, fold_bn_, prepare


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so a wrong fold cannot pass."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw_bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2, bias=False)
        self.up_bn = nn.BatchNorm2d(6, affine=False)
        self.side = nn.Conv2d(6, 6, 1)  # feeds a BN *and* a residual sum: not foldable
        self.side_bn = nn.BatchNorm2d(6)
        self.post = nn.Conv2d(6, 4, 1)  # conv -> ReLU -> BN: not foldable
        self.post_bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = self.up_bn(self.up(x))
        s = self.side(x)
        x = self.side_bn(s) + s
        return self.post_bn(torch.relu(self.post(x)))


EXPECTED = [("stem.0", "stem.1"), ("dw", "dw_bn"), ("up", "up_bn")]


def _masked_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    _randomise_bn(net)
    for name in ("stem.0", "dw", "up"):
        layer = net.get_submodule(name)
        attach_mask(layer)
        set_mask(layer, (torch.rand_like(layer.parametrizations.weight.original) > 0.6).float())
        zero_pruned_(layer)
    return net.eval()


def test_pairs_found_by_fx_only_where_conv_feeds_only_a_bn() -> None:
    assert find_conv_bn_pairs(Net()) == EXPECTED


def test_pairs_found_when_convs_carry_masks() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fx must trace parametrized convs, not fall back
        assert find_conv_bn_pairs(_masked_net()) == EXPECTED


def test_fold_matches_eval_output_and_keeps_zeros() -> None:
    net = _masked_net()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        before = net(x)
    pruned = {n: net.get_submodule(n).parametrizations.weight[0].mask == 0 for n, _ in EXPECTED}
    params = {n: net.get_submodule(n).parametrizations.weight.original for n, _ in EXPECTED}
    fold_bn_(net, find_conv_bn_pairs(net))
    with torch.no_grad():
        after = net(x)
    assert torch.allclose(before, after, atol=1e-5)
    for name, _ in EXPECTED:
        layer = net.get_submodule(name)
        assert layer.parametrizations.weight.original is params[name]  # same Parameter object
        assert layer.weight[pruned[name]].eq(0).all()
        assert layer.parametrizations.weight.original[pruned[name]].eq(0).all()
        assert layer.bias is not None  # created where the conv had none
    assert isinstance(net.stem[1], nn.Identity) and isinstance(net.dw_bn, nn.Identity) and isinstance(net.up_bn, nn.Identity)
    assert isinstance(net.side_bn, nn.BatchNorm2d) and isinstance(net.post_bn, nn.BatchNorm2d)


@pytest.mark.parametrize(
    "conv,bn,shape",
    [
        (nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), (2, 3, 9)),
        (nn.Conv3d(2, 4, 3, groups=2), nn.BatchNorm3d(4), (1, 2, 5, 5, 5)),
        (nn.ConvTranspose1d(4, 6, 3, groups=2), nn.BatchNorm1d(6), (2, 4, 7)),
        (nn.ConvTranspose2d(3, 5, 2, stride=2), nn.BatchNorm2d(5), (2, 3, 4, 4)),
    ],
)
def test_fold_other_layer_kinds(conv: nn.Module, bn: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(conv, bn).eval()
    _randomise_bn(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
        fold_bn_(model, find_conv_bn_pairs(model))
        assert torch.allclose(model(x), ref, atol=1e-5)


class Dynamic(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.unused = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))  # only called on a branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.sum() > 1e9:
            y = self.unused(y)
        return y


def test_fallback_to_sequential_adjacency_with_warning() -> None:
    model = Dynamic()
    with pytest.warns(UserWarning, match="falling back"):
        pairs = find_conv_bn_pairs(model)
    assert pairs == [("body.0", "body.1"), ("body.3", "body.4"), ("unused.0", "unused.1")]
    # With example inputs, one forward confirms which BatchNorms really receive their conv's output.
    with pytest.warns(UserWarning, match="falling back"):
        confirmed = find_conv_bn_pairs(model, example_inputs=torch.randn(1, 1, 5, 5))
    assert confirmed == [("body.0", "body.1"), ("body.3", "body.4")]
    assert model.training  # mode restored
    _randomise_bn(model)
    model.eval()
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        ref = model(x)
        fold_bn_(model, confirmed)
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_shared_module_is_not_paired() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(self.conv(x)))

    assert find_conv_bn_pairs(Twice()) == []


def test_fold_refuses_bad_pairs_and_quantized_convs() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(PrunqError, match="not a conv followed"):
        fold_bn_(model, [("3", "1")])
    prepare(model, QuantConfig(act_bits=32))
    with pytest.raises(PrunqError, match="fold before prepare"):
        fold_bn_(model, [("0", "1")])
