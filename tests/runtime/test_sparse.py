"""The sparse CPU runtime: CSR layers give the dense outputs; the choice is measured; what it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.prune import masks as M
from prunq.runtime.sparse import SparseConv2d, SparseLinear, desparsify, sparsify


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(16, 16, 1)
        self.c3 = nn.Conv2d(16, 8, 3, padding=2, dilation=2, bias=False)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # grouped: stays dense
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = self.g(torch.relu(self.c3(x)))
        return self.fc(x.flatten(1))


def _sparse_net(density: float = 0.05) -> nn.Module:
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_((torch.rand_like(m.weight) < density).float())
    return net


def test_every_swapped_layer_gives_the_dense_output():
    net = _sparse_net()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = net(x)
    report = sparsify(net, x, min_speedup=0.0)  # swap whatever is sparse enough, to test the kernels
    kinds = {n: type(m) for n, m in net.named_modules() if n}
    assert kinds["c1"] is SparseConv2d and kinds["c2"] is SparseConv2d and kinds["c3"] is SparseConv2d
    assert kinds["fc"] is SparseLinear and kinds["g"] is nn.Conv2d and "g" not in report
    assert all(r["sparse"] and r["sparsity"] > 0.8 and r["dense_ms"] > 0 for r in report.values())
    with torch.no_grad():
        got = net(x)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        assert torch.allclose(copy.deepcopy(net)(x), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert set(net.state_dict()) == set(_Net().state_dict())  # the dense weights stay the parameters
    desparsify(net)
    assert {type(m) for m in net.modules()} == {_Net, nn.Conv2d, nn.Linear}


def test_the_choice_is_measured_and_dense_layers_are_left_alone():
    net = _sparse_net(density=1.0)  # nothing to gain: no layer reaches min_sparsity
    report = sparsify(net, torch.randn(1, 3, 16, 16))
    assert not any(r["sparse"] for r in report.values()) and all("dense_ms" not in r for r in report.values())
    net = _sparse_net()
    report = sparsify(net, torch.randn(1, 3, 16, 16), min_speedup=1e9)  # never fast enough
    assert all(not r["sparse"] and r["sparse_ms"] > 0 for r in report.values())
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in net.modules())


def test_a_model_with_masks_must_be_converted_first():
    net = _sparse_net()
    M.attach_mask(net.fc)
    with pytest.raises(PrunqError, match="convert it first"):
        sparsify(net, torch.randn(1, 3, 16, 16))
