"""The sparse CPU runtime: the direct kernel and the CSR forms give the dense outputs on every geometry;
BatchNorm / ReLU fusion and the ConvTranspose rewrite are exact; the choice is measured; what it refuses."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunq.core.errors import PrunqError
from prunq.prune import masks as M
from prunq.runtime import _direct
from prunq.runtime.sparse import (
    AbsorbedBatchNorm2d, AbsorbedReLU, SparseConv2d, SparseConvTranspose2d, SparseLinear, convtranspose_as_conv3x3,
    desparsify, sparsify,
)  # fmt: skip


@pytest.fixture(scope="module")
def kernel():
    """The direct kernel, built once (about 25 s the first time on a machine). A machine without g++
    skips; one with g++ must build it."""
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the direct kernel cannot be built here")
    ok, why = _direct.available()
    assert ok, why
    return _direct


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= tol * max(1.0, float(a.abs().max()))


@pytest.mark.parametrize("k,stride,padding,dilation,h,w", [
    (3, 1, 1, 1, 20, 150),   # stride 1, wide: vector interior + scalar borders
    (3, 1, 2, 2, 17, 130),   # dilated
    (3, 1, 0, 1, 9, 100),    # no padding
    (1, 1, 0, 1, 8, 70),     # 1x1
    (5, 1, 2, 1, 11, 90),    # 5x5
    (3, 1, 1, 1, 8, 8),      # narrower than a vector block: the phase-split plan
    (3, 2, 1, 1, 21, 133),   # stride 2, odd sizes
    (3, 2, 1, 2, 16, 70),    # stride 2, dilated
    (4, 3, 0, 1, 13, 50),    # stride 3, even kernel
])  # fmt: skip
@pytest.mark.parametrize("relu", [False, True])
def test_the_direct_kernel_equals_conv2d(kernel, k, stride, padding, dilation, h, w, relu):
    g = torch.Generator().manual_seed(k * 100 + stride * 10 + h)
    weight = torch.randn(6, 5, k, k, generator=g) * (torch.rand(6, 5, k, k, generator=g) < 0.2)
    bias = torch.randn(6, generator=g)
    x = torch.randn(2, 5, h, w, generator=g)
    want = F.conv2d(x, weight, bias, stride, padding, dilation)
    want = torch.relu(want) if relu else want
    plan = kernel.make_plan(weight, bias, stride, padding, dilation, tuple(x.shape), relu=relu)
    got = plan(x)
    assert got.shape == want.shape and _close(want, got)
    assert _close(want, plan(x))  # a plan is reusable (its scratch buffer is overwritten)
    empty = kernel.make_plan(torch.zeros_like(weight), None, stride, padding, dilation, tuple(x.shape))
    assert torch.equal(empty(x), torch.zeros_like(want))  # no non-zeros at all


def test_a_transposed_conv_is_a_3x3_conv_and_a_pixel_shuffle():
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(5, 3, 4, stride=2, padding=1, bias=False)
    x = torch.randn(2, 5, 7, 9)
    with torch.no_grad():
        want = up(x)
        got = F.pixel_shuffle(F.conv2d(x, convtranspose_as_conv3x3(up.weight), None, 1, 1), 2)
    assert _close(want, got, 1e-6)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(16, 16, 1)
        self.c3 = nn.Conv2d(16, 8, 3, padding=2, dilation=2, bias=False)
        self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.r2 = nn.ReLU()
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # grouped: stays dense
        self.fc = nn.Linear(8 * 32 * 32, 10)

    def forward(self, x):
        x = self.r1(self.bn1(self.c1(x)))
        x = torch.relu(self.c2(x))
        x = self.r2(self.bn2(self.up(self.c3(x))))
        return self.fc(self.g(x).flatten(1))


def _sparse_net(density: float = 0.05) -> nn.Module:
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                m.weight.mul_((torch.rand_like(m.weight) < density).float())
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so that folding is tested
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("use_kernel", [True, False], ids=["direct", "csr"])
def test_every_swapped_layer_gives_the_dense_output(use_kernel, request):
    if use_kernel:
        request.getfixturevalue("kernel")
    net = _sparse_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
    report = sparsify(net, x, min_speedup=0.0, kernel=use_kernel)  # swap whatever is sparse enough
    kinds = {n: type(m) for n, m in net.named_modules() if n}
    assert kinds["c1"] is SparseConv2d and kinds["c2"] is SparseConv2d and kinds["c3"] is SparseConv2d
    assert kinds["fc"] is SparseLinear and kinds["g"] is nn.Conv2d and "g" not in report
    assert kinds["bn1"] is AbsorbedBatchNorm2d and kinds["r1"] is AbsorbedReLU and report["c1"]["fused"] == ["bn1", "r1"]
    if use_kernel:  # the ConvTranspose rewrite needs the direct kernel
        assert kinds["up"] is SparseConvTranspose2d and kinds["bn2"] is AbsorbedBatchNorm2d
        assert report["up"]["impl"] == "direct" and report["c3"]["impl"] in ("direct", "csr")
    else:
        assert kinds["up"] is nn.ConvTranspose2d and all(r["impl"] in ("csr", "dense") for r in report.values())
    swapped = {n: r for n, r in report.items() if use_kernel or n != "up"}  # CSR has no ConvTranspose form
    assert all(r["sparse"] and r["sparsity"] > 0.8 and r["dense_ms"] > 0 for r in swapped.values())
    with torch.no_grad():
        assert _close(want, net(x))
        assert _close(want, copy.deepcopy(net)(x))
        assert _close(want[:1], net(x[:1]))  # another input shape: a new plan
    after = net.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    desparsify(net)
    assert {type(m) for m in net.modules()} == {_Net, nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU, nn.Linear}
    with torch.no_grad():
        assert torch.equal(net(x), want)


def test_the_choice_is_measured_and_dense_layers_are_left_alone():
    net = _sparse_net(density=1.0)  # nothing to gain: no layer reaches min_sparsity
    report = sparsify(net, torch.randn(1, 3, 32, 32), kernel=False)
    assert not any(r["sparse"] for r in report.values()) and all("dense_ms" not in r for r in report.values())
    net = _sparse_net()
    report = sparsify(net, torch.randn(1, 3, 32, 32), min_speedup=1e9, kernel=False)  # never fast enough
    assert all(not r["sparse"] and r["sparse_ms"] > 0 for r in report.values() if "dense_ms" in r)
    assert not any(isinstance(m, (SparseConv2d, SparseLinear, AbsorbedBatchNorm2d)) for m in net.modules())


def test_a_model_with_masks_must_be_converted_first():
    net = _sparse_net()
    M.attach_mask(net.fc)
    with pytest.raises(PrunqError, match="convert it first"):
        sparsify(net, torch.randn(1, 3, 32, 32))


def test_a_model_not_faster_as_a_whole_is_put_back(monkeypatch):
    from prunq.runtime import sparse as S

    net = _sparse_net()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
    # every conv "10x faster" alone (the dense conv+BN+ReLU is timed through a function named dense_fn)
    monkeypatch.setattr(S, "_time", lambda fn, reps, min_s=0.0: 1.0 if fn.__name__ == "dense_fn" else 0.1)
    calls = []

    def slower(model, args, swaps, reps):
        calls.append(len(swaps))
        for m, dense_cls, _ in swaps:
            m.__class__ = dense_cls
        return False

    monkeypatch.setattr(S, "_whole_model_faster", slower)
    report = sparsify(net, x, kernel=False)
    assert calls and all(not r["sparse"] for r in report.values())
    assert any(r.get("reverted") for r in report.values())
    assert {type(m) for m in net.modules()} == {_Net, nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU, nn.Linear}
    with torch.no_grad():
        assert torch.equal(net(x), want)


def test_a_swapped_model_runs_with_autograd_on_and_an_explicit_output_size(kernel):
    net = _sparse_net()
    x = torch.randn(1, 3, 32, 32)
    sparsify(net, x, min_speedup=0.0)
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        want = net(x)
    assert torch.allclose(net(xg).detach(), want, atol=1e-5)  # outside no_grad: no view-in-no_grad error
    up = net.up
    assert isinstance(up, SparseConvTranspose2d)
    h = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        odd = up(h, output_size=(11, 11))
        dense = F.conv_transpose2d(h, up.weight, None, 2, 1, 1)  # output padding 1: 11 x 11
        dense = torch.relu(net.bn2.__class__.__bases__[0].forward(net.bn2, dense))
    assert odd.shape[-2:] == (11, 11) and _close(dense, odd)


def test_a_float64_model_is_left_alone():
    net = _sparse_net().double()
    report = sparsify(net, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert report == {} and not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in net.modules())


@pytest.mark.parametrize("h,w", [(9, 150), (5, 8)])  # the stride-1 kernel; narrow: its fallback
def test_the_pixel_shuffle_fused_into_the_kernel_equals_pixel_shuffle(kernel, h, w):
    g = torch.Generator().manual_seed(h)
    weight = torch.randn(12, 5, 3, 3, generator=g) * (torch.rand(12, 5, 3, 3, generator=g) < 0.3)
    bias = torch.randn(12, generator=g)
    x = torch.randn(2, 5, h, w, generator=g)
    want = F.pixel_shuffle(torch.relu(F.conv2d(x, weight, bias, 1, 1)), 2)
    got = kernel.make_plan(weight, bias, 1, 1, 1, tuple(x.shape), relu=True, shuffle=True)(x)
    assert got.shape == want.shape and _close(want, got)
