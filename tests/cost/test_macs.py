"""MACs per example (METHOD.md §4), checked against torch's own FlopCounterMode (FLOPs = 2 x MACs).

FlopCounterMode counts what actually runs, whatever the layout; prunq counts by hooks and divides by the
example batch. They must agree layer by layer on weight ops (``convolution``, ``mm``, ``addmm``). The
attention score/value products (``bmm``, SDPA) are activation x activation, not weight MACs: they are left
out of the weight comparison and checked separately against ``count_attention_macs``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunq.core.attention import DecomposedAttention, decompose_attention_
from prunq.core.errors import PrunqError
from prunq.core.layers import compressible_layers
from prunq.cost.macs import count_attention_macs, count_macs, example_batch_size
from prunq.cost.measure import measure

WEIGHT_OPS = {"convolution", "mm", "addmm", "linear"}
ACT_OPS = {"bmm", "baddbmm"}


def _flops(model: nn.Module, inputs: tuple) -> dict[str, dict[str, int]]:
    """FlopCounterMode's counts per module path (``Model.sub.layer``) and op name, in eval / no_grad."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*inputs)
    return {k: {str(op).rsplit(".", 1)[-1]: v for op, v in d.items()} for k, d in fc.get_flop_counts().items()}


def _reference_macs(model: nn.Module, inputs: tuple, batch: int, ops: set[str] = WEIGHT_OPS) -> dict[str, int]:
    """Per-layer and total ("Global") MACs per example by FlopCounterMode."""
    flops = _flops(model, inputs)
    prefix = type(model).__name__
    out = {}
    for name, _ in compressible_layers(model):
        key = f"{prefix}.{name}" if name else prefix
        f = sum(v for op, v in flops.get(key, {}).items() if op in ops)
        assert f % (2 * batch) == 0, (name, f, batch)
        out[name] = f // (2 * batch)
    out["Global"] = sum(v for op, v in flops["Global"].items() if op in ops) // (2 * batch)
    return out


def _check(model: nn.Module, inputs: tuple, batch: int, **kw) -> dict[str, int]:
    macs = count_macs(model, inputs, **kw)
    ref = _reference_macs(model, inputs, batch)
    assert macs == {k: v for k, v in ref.items() if k != "Global"}
    assert sum(macs.values()) == ref["Global"] > 0
    return macs


# ---------------------------------------------------------------------------------------------------
# Model kinds against FlopCounterMode
# ---------------------------------------------------------------------------------------------------


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped = nn.Conv2d(8, 12, 3, stride=2, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.pointwise = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.grouped(self.stem(x))))
        x = self.pointwise(torch.relu(self.depthwise(x)))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("batch", [1, 3])
def test_cnn_with_bn_relu_grouped_and_depthwise(batch):
    net = _CNN()
    macs = _check(net, (torch.randn(batch, 3, 9, 9),), batch)
    # hand check of one layer: grouped conv 9x9 -> 4x4, 12 outputs x (8/4 * 3 * 3) weights each
    assert macs["grouped"] == 12 * 4 * 4 * 2 * 9
    assert macs == count_macs(net, (torch.randn(1, 3, 9, 9),))  # per example: the batch does not matter


def test_conv_transpose_stride_2():
    net = nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2),
    )
    macs = _check(net, (torch.randn(2, 4, 5, 5),), 2)
    # scatter count: every input element x out/groups x prod(kernel)
    assert macs == {"0": 4 * 25 * 6 * 9, "2": 6 * 100 * 2 * 4}


class _Tokens(nn.Module):
    """A Linear on (B, T, D), then one on (B*T, D) after a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.flat = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        y = self.fc(x)
        return self.flat(y.reshape(b * t, -1)).view(b, t, -1)


def test_linear_on_batch_time_features_and_reshaped_batch_time():
    macs = _check(_Tokens(), (torch.randn(4, 7, 6),), 4)
    assert macs == {"fc": 7 * 8 * 6, "flat": 7 * 5 * 8}  # per example: T x out x in


class _SeqFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, B, D)
        return self.fc(x)


class _TransposeInside(nn.Module):
    """Batch-first outside, sequence-first inside: the layer's first dim is T, the example's is B."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
        return self.fc(x.transpose(0, 1).contiguous())


def test_linear_on_sequence_first_input():
    t, b = 12, 3
    macs = _check(_SeqFirst(), (torch.randn(t, b, 6),), b, batch_size=b)
    assert macs == {"fc": t * 5 * 6}
    macs = _check(_TransposeInside(), (torch.randn(b, t, 6),), b)
    assert macs == {"fc": t * 5 * 6}  # dividing by the layer input's dim 0 (T) gave 12x too few


def test_unbatched_conv_input_counts_one_example():
    net = nn.Sequential(nn.Conv2d(4, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3, padding=1))
    unbatched = _check(net, (torch.randn(4, 5, 5),), 1)
    assert unbatched == {"0": 648, "2": 3 * 3 * 3 * 2 * 9}  # review spot-check 1: 648, not 144
    assert unbatched == count_macs(net, (torch.randn(1, 4, 5, 5),))
    assert count_macs(nn.Sequential(nn.Linear(6, 5)), (torch.randn(6),)) == {"0": 30}  # a vector is one example


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_projections(batch_first):
    d, heads, ff, t, b = 16, 4, 32, 6, 3
    layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=batch_first)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    decompose_attention_(enc)
    x = torch.randn(b, t, d) if batch_first else torch.randn(t, b, d)
    kw = {} if batch_first else {"batch_size": b}
    macs = _check(enc, (x,), b, **kw)
    for i in range(2):
        p = f"layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert macs[f"{p}.self_attn.{proj}"] == t * d * d
        assert macs[f"{p}.linear1"] == macs[f"{p}.linear2"] == t * d * ff
    # Score/value products: activation x activation, counted apart (2 x T x T x d per layer).
    assert count_attention_macs(enc, (x,), **kw) == {f"layers.{i}.self_attn": 2 * t * t * d for i in range(2)}


def test_sequence_first_example_without_batch_size_warns():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 1, enable_nested_tensor=False)
    decompose_attention_(enc)
    x = torch.randn(5, 2, 8)  # (T, B, D): the leading dim is not the batch
    with pytest.warns(UserWarning, match="batch_size"):
        wrong = count_macs(enc, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        right = count_macs(enc, (x,), batch_size=2)
    assert all(right[k] * 2 == wrong[k] * 5 for k in right)


def test_undecomposed_attention_warns():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    with pytest.warns(UserWarning, match="decompose_attention_"):
        macs = count_macs(Net(), (torch.randn(2, 3, 8),))
    assert macs == {"attn.out_proj": 0}  # the bug this warns about


def test_attention_matmul_macs_against_flop_counter():
    """With ``need_weights=True`` the products run as explicit matmuls, which FlopCounterMode counts."""

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = DecomposedAttention(8, 2, kdim=6, vdim=5, batch_first=True)

        def forward(self, q, k, v):
            return self.attn(q, k, v, need_weights=True)[0]

    net = Cross()
    inputs = (torch.randn(3, 4, 8), torch.randn(3, 7, 6), torch.randn(3, 7, 5))
    act = count_attention_macs(net, inputs)
    assert act == {"attn": 2 * 4 * 7 * 8}
    ref = _reference_macs(net, inputs, 3, ACT_OPS)
    assert ref["Global"] == act["attn"]
    macs = _check(net, inputs, 3)
    assert macs == {"attn.q_proj": 4 * 8 * 8, "attn.k_proj": 7 * 8 * 6, "attn.v_proj": 7 * 8 * 5, "attn.out_proj": 256}


# ---------------------------------------------------------------------------------------------------
# Hook mechanics (as the previous cost.measure.count_macs)
# ---------------------------------------------------------------------------------------------------


def test_sums_repeated_calls_excludes_and_restores_modes():
    class Siamese(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feat = nn.Linear(4, 3)  # called twice: 2 * 12 = 24
            self.bn = nn.BatchNorm1d(3)  # a batch of 1 in train mode would raise: must run in eval
            self.head = nn.Linear(3, 2)  # 6
            self.unused = nn.Linear(5, 5)  # never called: 0
            self.drop = nn.Dropout()

        def forward(self, a, b):
            return self.head(self.drop(self.bn(self.feat(a) + self.feat(b))))

    net = Siamese()
    net.train()
    net.head.eval()  # mixed modes are restored module by module
    x = (torch.ones(1, 4), torch.ones(1, 4))
    assert count_macs(net, x) == {"feat": 24, "head": 6, "unused": 0}
    assert count_macs(net, x, exclude=("he*",)) == {"feat": 24, "unused": 0}
    assert net.training and net.bn.training and net.feat.training and not net.head.training
    assert not any(m._forward_hooks for m in net.modules())


def test_keyword_only_call_and_nested_example_inputs():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, batch: dict):
            return self.fc(input=batch["x"])

    assert count_macs(Net(), ({"x": torch.randn(5, 4)},)) == {"fc": 12}
    assert example_batch_size(({"x": torch.randn(5, 4)}, torch.zeros(2))) == 5


def test_explicit_batch_size_wins_and_is_validated():
    net = nn.Sequential(nn.Conv2d(2, 3, 3))
    assert count_macs(net, (torch.zeros(4, 2, 5, 5),)) == {"0": 486}
    assert count_macs(net, (torch.zeros(4, 2, 5, 5),), batch_size=2) == {"0": 972}
    for bad in (0, -1, 1.5, True):
        with pytest.raises(PrunqError, match="batch_size"):
            count_macs(net, (torch.zeros(1, 2, 5, 5),), batch_size=bad)
    with pytest.raises(PrunqError, match="batch_size"):
        count_macs(nn.Sequential(), (3,))


def test_conv2d_macs_on_5x5():
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 3, stride=2, padding=1))
    macs = count_macs(m, (torch.zeros(1, 2, 5, 5),))
    # conv 0: output 3 x 3 x 3 = 27 elements, each 2 * 3 * 3 = 18 weights -> 486
    # conv 1 on 3 x 3: stride 2, pad 1 -> 2 x 2 output, 4 channels = 16 elements * 3 * 9 = 27 -> 432
    assert macs == {"0": 486, "1": 432}


def test_conv_transpose_and_grouped_macs():
    m = nn.ModuleDict(
        {
            "t": nn.ConvTranspose2d(2, 3, 3),  # each of 2 * 25 = 50 inputs hits 3 * 9 weights -> 1350
            "g": nn.Conv2d(4, 6, 3, groups=2, padding=1),  # 6 * 25 = 150 outputs * (2 * 9) -> 2700
            "gt": nn.ConvTranspose2d(4, 6, 3, groups=2),  # 100 inputs * (6 / 2) * 9 -> 2700
        }
    )

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = m

        def forward(self, x2, x4):
            return self.m["t"](x2), self.m["g"](x4), self.m["gt"](x4)

    net = Net()
    inputs = (torch.zeros(1, 2, 5, 5), torch.zeros(1, 4, 5, 5))
    assert count_macs(net, inputs) == {"m.t": 1350, "m.g": 2700, "m.gt": 2700}
    c = measure(net, inputs)
    # canonical shapes: (out, in_per_group, k, k)
    assert [lc.shape for lc in c.layers] == [(3, 2, 3, 3), (6, 2, 3, 3), (6, 2, 3, 3)]
    assert c.macs == 1350 + 2700 + 2700


def test_macs_divided_by_batch():
    m = nn.Sequential(nn.Conv2d(2, 3, 3))
    assert count_macs(m, (torch.zeros(4, 2, 5, 5),)) == {"0": 486}


# ---------------------------------------------------------------------------------------------------
# One layer, measured
# ---------------------------------------------------------------------------------------------------


def test_a_conditioning_vector_does_not_make_every_layer_count_the_batch():
    """Review: one Linear on a vector made count_macs divide every layer by 1."""

    class Film(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.film = nn.Linear(16, 32)
            self.body = nn.Linear(32, 32)

        def forward(self, x):
            return self.body(x) * self.film(torch.ones(16))

    for b in (1, 4):
        assert count_macs(Film(), (torch.zeros(b, 32),)) == {"film": 512 // b, "body": 1024}
