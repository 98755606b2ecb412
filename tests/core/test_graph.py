"""ChannelGraph: producer -> consumer channel coupling and dead input channels, on hand-built models."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from prunq.core.graph import ChannelGraph
from prunq.prune.masks import attach_mask, set_mask


def _dead(model: nn.Module, x, layer: str) -> list[bool]:
    return ChannelGraph.build(model, x).dead_input_channels(model)[layer].tolist()


def _assert_sound(model: nn.Module, x, graph: ChannelGraph) -> int:
    """Every channel the graph calls dead is exactly zero in the layer's real input; returns how many."""
    dead = graph.dead_input_channels(model)
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach()))
        for n, m in model.named_modules()
        if n in dead
    ]
    with torch.no_grad():
        model(*(x if isinstance(x, tuple) else (x,)))
    for h in handles:
        h.remove()
    for name, d in dead.items():
        t = seen[name]
        cdim = t.dim() - 1 if isinstance(model.get_submodule(name), nn.Linear) else 1
        zero = t.movedim(cdim, 0).reshape(t.shape[cdim], -1).eq(0).all(1)
        assert not (d & ~zero).any(), name
    return sum(int(d.sum()) for d in dead.values())


@torch.no_grad()
def _prune_random_filters(model: nn.Module, fraction: float) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if isinstance(m, nn.ConvTranspose2d):
                m.weight[:, torch.rand(m.weight.shape[1]) < fraction] = 0.0
            else:
                m.weight[torch.rand(m.weight.shape[0]) < fraction] = 0.0


def _zero_filters(conv: nn.Module, channels: list[int]) -> None:
    with torch.no_grad():
        conv.weight[channels] = 0.0
        if conv.bias is not None:
            conv.bias[channels] = 0.0


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(3, 4, 1, bias=False)
        self.relu = nn.ReLU()
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.relu(self.a(x) + self.b(x)))


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1, bias=False)
        self.b = nn.Conv2d(3, 3, 1, bias=False)
        self.c = nn.Conv2d(5, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


def _separable(dw_bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 1, bias=False),  # 0: pointwise in
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=dw_bias),  # 2: depthwise
        nn.Conv2d(4, 2, 1),  # 3: pointwise out
    )


X = torch.randn(2, 3, 6, 6)


def test_sequential_conv_bn_relu_conv() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3)).eval()
    _zero_filters(model[0], [1, 3])  # fresh BN: mean 0, var 1, gamma 1, beta 0 -> maps 0 to 0
    graph = ChannelGraph.build(model, X)
    dead = graph.dead_input_channels(model)
    assert dead["3"].tolist() == [False, True, False, True]
    assert dead["0"].tolist() == [False, False, False]  # the model input is never dead
    assert graph.sources("3")[1] == {("0", 1)}
    assert graph.sources("0")[2] == {("<input:input>", 2)}
    assert graph.conv_bn_pairs() == [("0", "1")]
    assert graph.consumers("0") == {"3": [(0, 0), (1, 1), (2, 2), (3, 3)]}
    assert graph.coupled_groups() == []


def test_bn_shift_keeps_channel_alive_unless_it_cancels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3, eps=0.0), nn.ReLU(), nn.Conv2d(3, 1, 1))
    model.eval()
    _zero_filters(model[0], [0, 1, 2])
    bn = model[1]
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.0, 0.5, 6.0]))  # channel 1: beta alone; channel 2: 6 - 3 * 2 / 1 = 0
        bn.running_mean.copy_(torch.tensor([0.0, 0.0, 3.0]))
        bn.weight.copy_(torch.tensor([1.0, 1.0, 2.0]))
    assert _dead(model, X, "3") == [True, False, True]
    model.train()  # batch statistics: 0 -> beta, so only channel 0 stays dead
    assert _dead(model, X, "3") == [True, False, False]
    assert all(m.training for m in model.modules())  # build restored the training flags


def test_bias_makes_a_zero_filter_a_constant() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    _zero_filters(model[0], [1, 3])
    with torch.no_grad():
        model[0].bias[1] = 0.5
    assert _dead(model, X, "2") == [False, False, False, True]


def test_residual_add_needs_both_branches_dead() -> None:
    model = _Residual()
    _zero_filters(model.a, [0])
    _zero_filters(model.b, [0, 1])
    graph = ChannelGraph.build(model, X)
    assert graph.dead_input_channels(model)["c"].tolist() == [True, False, False, False]
    assert graph.sources("c")[1] == {("a", 1), ("b", 1)}
    assert graph.coupled_groups() == [frozenset({("a", k), ("b", k)}) for k in range(4)]


def test_concat_offsets_channels() -> None:
    model = _Concat()
    _zero_filters(model.a, [1])
    _zero_filters(model.b, [0])
    graph = ChannelGraph.build(model, X)
    assert graph.dead_input_channels(model)["c"].tolist() == [False, True, True, False, False]
    assert graph.sources("c")[3] == {("b", 1)}
    assert graph.consumers("b") == {"c": [(0, 2), (1, 3), (2, 4)]}


def test_depthwise_passes_deadness_through() -> None:
    model = _separable()
    _zero_filters(model[0], [2])  # dead input 2 -> depthwise output 2 is dead too
    _zero_filters(model[2], [0])  # a zero depthwise filter kills output 0
    graph = ChannelGraph.build(model, X)
    dead = graph.dead_input_channels(model)
    assert dead["2"].tolist() == [False, False, True, False]
    assert dead["3"].tolist() == [True, False, True, False]
    assert graph.sources("3")[2] == {("2", 2)}
    assert frozenset({("0", 2), ("2", 2)}) in graph.coupled_groups()


def test_depthwise_bias_keeps_channel_alive() -> None:
    model = _separable(dw_bias=True)
    _zero_filters(model[0], [2])
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([0.0, 0.0, 0.3, 0.0]))
    assert _dead(model, X, "3") == [False, False, False, False]


def test_flatten_into_linear_maps_channel_to_its_block() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.Flatten(), nn.Linear(12, 2))
    _zero_filters(model[0], [1])  # 4x4 input -> 2x2 maps: channel 1 is features 4..7
    graph = ChannelGraph.build(model, torch.randn(2, 1, 4, 4))
    assert graph.dead_input_channels(model)["2"].tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert graph.sources("2")[5] == {("0", 1)}


def test_view_and_global_pool_into_linear() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv(x)).mean((2, 3), keepdim=True)
            return self.fc(y.view(y.size(0), -1) * 2.0)

    model = Net()
    _zero_filters(model.conv, [3])
    assert _dead(model, X, "fc") == [False, False, False, True]


def test_conv_transpose_as_producer_and_consumer() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 3, 1, bias=False), nn.ConvTranspose2d(3, 4, 2, stride=2, bias=False), nn.Conv2d(4, 2, 1)
    )
    _zero_filters(model[0], [0])
    with torch.no_grad():
        model[1].weight[:, 1] = 0.0  # stored (in, out, k, k): output channel 1
    graph = ChannelGraph.build(model, X)
    dead = graph.dead_input_channels(model)
    assert dead["1"].tolist() == [True, False, False]
    assert dead["2"].tolist() == [False, True, False, False]
    assert graph.conv_bn_pairs() == []


def test_scalar_offset_and_sigmoid_are_not_zero_preserving() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1, bias=False)
            self.b = nn.Conv2d(6, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(torch.cat([y * 3.0 - 0.0, torch.sigmoid(y) + 0.0], 1))

    model = Net()
    _zero_filters(model.a, [0, 2])
    graph = ChannelGraph.build(model, X)
    assert graph.dead_input_channels(model)["b"].tolist() == [True, False, True, False, False, False]
    assert graph.sources("b")[3] == {("a", 0)}  # sigmoid(0) = 0.5: alive, but still fed by a's channel 0


def test_gate_product_is_dead_when_either_factor_is() -> None:
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1, bias=False)
            self.fc = nn.Linear(4, 4)
            self.out = nn.Conv2d(4, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            gate = torch.relu(self.fc(y.mean((2, 3))))
            return self.out(y * gate[:, :, None, None])

    model = Gated()
    _zero_filters(model.conv, [0])
    _zero_filters(model.fc, [3])
    graph = ChannelGraph.build(model, X)
    assert graph.dead_input_channels(model)["out"].tolist() == [True, False, False, True]
    assert graph.dead_input_channels(model)["fc"].tolist() == [True, False, False, False]
    assert frozenset({("conv", 2), ("fc", 2)}) in graph.coupled_groups()
    assert _assert_sound(model, X, graph) == 3


def test_channel_last_linear_after_permute_and_slice() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 1, bias=False)
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(self.conv(x).permute(0, 2, 1))  # (B, L, 3)
            return self.b(y[..., 1:])

    model = Seq()
    _zero_filters(model.conv, [0])
    _zero_filters(model.a, [2])
    graph = ChannelGraph.build(model, torch.randn(2, 3, 7))
    dead = graph.dead_input_channels(model)
    assert dead["a"].tolist() == [True, False, False, False]
    assert dead["b"].tolist() == [False, True]
    assert graph.sources("b")[1] == {("a", 2)}


def test_untraceable_model_is_all_alive_with_one_warning() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 2, 1)
            self.b = nn.Conv2d(2, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(y) if y.sum() > 0 else self.b(-y)

    model = Dynamic()
    _zero_filters(model.a, [0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ChannelGraph.build(model, X)
    assert len(caught) == 1 and "could not trace" in str(caught[0].message)
    assert not graph.traced
    dead = graph.dead_input_channels(model)
    assert {k: v.tolist() for k, v in dead.items()} == {"a": [False] * 3, "b": [False] * 2}
    assert graph.conv_bn_pairs() == [] and graph.coupled_groups() == [] and graph.sources("b") is None


def test_masked_and_quantized_layers_are_leaves() -> None:
    from prunq.quant.prepare import QuantConfig, prepare

    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    for layer in (model[0], model[3]):
        attach_mask(layer)
    mask = torch.ones_like(model[0].weight)
    mask[2] = 0.0
    set_mask(model[0], mask)
    # Uncalibrated input quantizers raise in forward: the shape pass must not run the pre-hooks.
    prepare(model, QuantConfig(weight_bits=4, act_bits=8))
    graph = ChannelGraph.build(model, X)
    assert graph.traced and graph.layers == ("0", "3")
    assert graph.conv_bn_pairs() == [("0", "1")]
    assert graph.dead_input_channels(model)["3"].tolist() == [False, False, True, False]


def test_standalone_quantizer_module_is_a_zero_preserving_leaf() -> None:
    from prunq.quant.act import ActQuantizer

    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), ActQuantizer(8), nn.Conv2d(4, 2, 1))  # uncalibrated
    _zero_filters(model[0], [1])
    assert _dead(model, X, "2") == [False, True, False, False]


def test_layer_called_twice_counts_as_alive_where_any_call_is() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 2, 1, bias=False)
            self.b = nn.Conv2d(3, 2, 1, bias=False)
            self.shared = nn.Conv2d(2, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(self.a(x)) + self.shared(self.b(x))

    model = Twice()
    _zero_filters(model.a, [0, 1])
    _zero_filters(model.b, [1])
    assert _dead(model, X, "shared") == [False, True]


def test_resnet20_couples_residual_adds() -> None:
    from prunq.quant.fold import find_conv_bn_pairs
    from prunq.tasks.classification.models import build

    model = build("resnet20").eval()
    graph = ChannelGraph.build(model, torch.randn(1, 3, 32, 32))
    assert graph.traced and len(graph.layers) == 22
    groups = graph.coupled_groups()
    stage1 = frozenset({("conv1", 5), ("layer1.0.conv2", 5), ("layer1.1.conv2", 5), ("layer1.2.conv2", 5)})
    stage3 = frozenset(
        {(n, 0) for n in ("layer3.0.shortcut.conv", "layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2")}
    )
    assert stage1 in groups and stage3 in groups
    assert len(groups) == 16 + 32 + 64
    assert graph.conv_bn_pairs() == find_conv_bn_pairs(model)
    assert len(graph.conv_bn_pairs()) == 21
    assert graph.sources("fc")[7] == {
        (n, 7) for n in ("layer3.0.shortcut.conv", "layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2")
    }

    dead = graph.dead_input_channels(model)
    assert not any(v.any() for v in dead.values())
    _zero_filters(model.conv1, [3])  # feeds layer1.0.conv1 alone; the add after layer1.0 revives it
    dead = graph.dead_input_channels(model)
    assert dead["layer1.0.conv1"].nonzero().flatten().tolist() == [3]
    assert not dead["layer1.1.conv1"].any()
    _prune_random_filters(model, 0.3)
    x = torch.randn(2, 3, 32, 32)
    assert _assert_sound(model, x, graph) > 50


def test_stereo_net_builds() -> None:
    from prunq.quant.fold import find_conv_bn_pairs
    from prunq.tasks.stereo.models import build

    model = build("stereo_net").eval()
    graph = ChannelGraph.build(model, (torch.rand(1, 3, 64, 128), torch.rand(1, 3, 64, 128)))
    assert graph.traced and len(graph.layers) == 13
    assert graph.conv_bn_pairs() == find_conv_bn_pairs(model)
    assert frozenset({("agg_up.conv", 0), ("agg_in.block2.conv", 0)}) in graph.coupled_groups()
    assert graph.sources("features.block2.conv")[0] == {("features.block1.conv", 0)}
    _zero_filters(model.features.block3.conv, [1])
    dead = graph.dead_input_channels(model)
    assert dead["features.block4.conv"].nonzero().flatten().tolist() == [1]
    # The cost volume and the split of the views are opaque functions: agg_in sees only live inputs.
    assert not dead["agg_in.block1.conv"].any()
    _prune_random_filters(model, 0.3)
    assert _assert_sound(model, (torch.rand(1, 3, 64, 128), torch.rand(1, 3, 64, 128)), graph) > 50
