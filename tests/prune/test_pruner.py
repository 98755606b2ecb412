import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunq.prune import masks as M
from prunq.core.errors import PrunqError
from prunq.core.layers import to_canonical
from prunq.prune.pruner import PruneConfig, Pruner


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
        nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), nn.Flatten(), nn.Linear(6 * 8 * 8, 10),
    )  # fmt: skip


def _kept(module):
    return int(M.get_mask(module).mask.sum())


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_global_magnitude_keeps_exact_count_without_floor(sparsity):
    net = _net()
    p = Pruner(net, PruneConfig(criterion="magnitude", mode="hard", min_density=0, min_per_channel=0))
    total = sum(layer.numel for layer in p.layers)
    p.prune(sparsity)
    assert sum(_kept(layer.module) for layer in p.layers) == round((1 - sparsity) * total)


def test_layer_allocation_gives_each_layer_the_same_sparsity():
    net = _net()
    p = Pruner(net, PruneConfig(criterion="magnitude", allocation="layer", min_density=0, min_per_channel=0))
    p.prune(0.75)
    for layer in p.layers:
        assert _kept(layer.module) == round(0.25 * layer.numel)


def test_global_magnitude_threshold_is_shared():
    net = _net()
    p = Pruner(net, PruneConfig(criterion="magnitude", min_density=0, min_per_channel=0))
    p.prune(0.8)
    kept_min = min(float(M.original(l.module).detach()[M.get_mask(l.module).mask.bool()].abs().min()) for l in p.layers)
    pruned_max = max(
        float(M.original(l.module).detach()[~M.get_mask(l.module).mask.bool()].abs().max()) for l in p.layers
    )
    assert kept_min >= pruned_max


def test_floor_keeps_one_weight_per_output_channel_and_min_density():
    net = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 4))
    with torch.no_grad():
        net[1].weight.mul_(1e-6)  # the global ranking alone would prune this layer to nothing
    p = Pruner(net, PruneConfig(criterion="magnitude", min_density=0.1, min_per_channel=1))
    p.prune(0.99)
    m1 = M.get_mask(net[1]).mask
    assert (m1.sum(1) >= 1).all()
    assert m1.sum() >= math.ceil(0.1 * 200)
    m0 = M.get_mask(net[0]).mask
    assert (m0.sum(1) >= 1).all()


@pytest.mark.parametrize("gran", ["2:4", "1:4", "3:8"])
def test_nm_masks_are_valid(gran):
    n, m = map(int, gran.split(":"))
    net = nn.Sequential(nn.Conv2d(16, 8, 3), nn.Flatten(), nn.Linear(8, 24))
    p = Pruner(net, PruneConfig(criterion="magnitude", granularity=gran))
    p.prune(0.5)
    conv_mask = to_canonical(M.get_mask(net[0]).mask, net[0])  # (out, in, kh, kw)
    blocks = conv_mask.permute(0, 2, 3, 1).reshape(8, 3, 3, 16 // m, m)
    assert (blocks.sum(-1) == n).all()
    lin = M.get_mask(net[2]).mask.reshape(24, 8 // m, m)
    assert (lin.sum(-1) == n).all()
    assert p.sparsity() == pytest.approx(1 - n / m)


def test_kernel_and_channel_masks_are_whole_groups():
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3))
    p = Pruner(net, PruneConfig(criterion="magnitude", granularity="kernel", min_per_channel=0, min_density=0))
    p.prune(0.6)
    k = M.get_mask(net[1]).mask.reshape(8, 8, 9).sum(-1)
    assert set(k.unique().tolist()) <= {0.0, 9.0}
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3))
    p = Pruner(net, PruneConfig(criterion="magnitude", granularity="channel", min_density=0))
    p.prune(0.5)
    c = M.get_mask(net[1]).mask.reshape(8, -1).sum(-1)
    assert set(c.unique().tolist()) <= {0.0, 72.0}


def test_exclude_and_override():
    net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 2))
    p = Pruner(net, PruneConfig(criterion="magnitude", exclude=("2",), overrides={"0": 0.9},
                                 min_density=0, min_per_channel=0))  # fmt: skip
    assert [layer.name for layer in p.layers] == ["0", "1"]
    p.prune(0.8)
    assert M.get_mask(net[2]) is None
    assert _kept(net[0]) == 10  # pinned at 90 %
    assert _kept(net[1]) == round(0.2 * 200) - 10  # the rest of the global budget


def test_hard_mode_never_revives_and_zeroes_shadows():
    net = nn.Sequential(nn.Linear(8, 4))
    p = Pruner(net, PruneConfig(criterion="magnitude", mode="hard", min_density=0, min_per_channel=0))
    p.prune(0.5)
    before = M.get_mask(net[0]).mask.clone()
    assert (M.original(net[0])[before == 0] == 0).all()
    with torch.no_grad():
        M.original(net[0])[before == 0] = 100.0  # even a huge shadow value cannot come back
    p.prune(0.5)
    assert torch.equal(M.get_mask(net[0]).mask, before)


def test_soft_mode_passes_gradient_to_pruned_weights():
    torch.manual_seed(0)
    for mode, expect_grad in (("soft", True), ("hard", False)):
        net = nn.Sequential(nn.Linear(8, 4))
        p = Pruner(net, PruneConfig(criterion="magnitude", mode=mode, min_density=0, min_per_channel=0))
        p.prune(0.5)
        pruned = M.get_mask(net[0]).mask == 0
        net(torch.randn(5, 8)).pow(2).sum().backward()
        g = M.original(net[0]).grad[pruned]
        assert bool((g != 0).any()) is expect_grad
        assert (net[0].weight[pruned] == 0).all()  # the forward always sees zeros


def test_soft_mode_revives_a_weight_when_its_taylor_score_rises():
    net = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        M_w = net[0].weight
        M_w.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    p = Pruner(net, PruneConfig(criterion="taylor", mode="soft", min_density=0, min_per_channel=0))
    shadow = M.original(net[0])
    shadow.grad = torch.ones_like(shadow)  # scores (w g)^2 = 1, 4, 9, 16
    p.accumulate()
    p.prune(0.5)
    assert M.get_mask(net[0]).mask.tolist() == [[0, 0, 1, 1]]
    # fine-tuning moves the pruned shadow weight 0 and its gradient grows: score (1 * 10)^2 = 100
    shadow.grad = torch.tensor([[10.0, 0.0, 1.0, 1.0]])
    p.accumulate()
    p.prune(0.5)
    assert M.get_mask(net[0]).mask.tolist() == [[1, 0, 0, 1]]


def test_schedule_drives_step_and_freezes():
    net = nn.Sequential(nn.Linear(16, 16))
    p = Pruner(net, PruneConfig(sparsity=0.9, criterion="magnitude", schedule="gradual", begin=0.0, end=0.5,
                                 frequency=5, min_density=0, min_per_channel=0), total_steps=40)  # fmt: skip
    seen = []
    for _ in range(40):
        cut = p.step()
        if cut is not None:
            seen.append(cut)
    assert seen == sorted(seen)
    assert seen[-1] == pytest.approx(0.9, abs=1 / 256)
    assert p.frozen and not M.get_mask(net[0]).soft
    assert p.t == 40
    state = p.state_dict()
    q = Pruner(nn.Sequential(nn.Linear(16, 16)), p.config, total_steps=40)
    q.load_state_dict(state)
    assert q.t == 40 and q.frozen


def test_no_prunable_layer_is_a_clear_error():
    with pytest.raises(PrunqError, match="no prunable layer"):
        Pruner(nn.Sequential(nn.ReLU()), PruneConfig())
    with pytest.raises(PrunqError, match="no prunable layer"):
        Pruner(nn.Sequential(nn.Linear(2, 2)), PruneConfig(exclude=("*",)))


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 12), inp=st.integers(1, 12), sparsity=st.floats(0.0, 0.99),
    gran=st.sampled_from(["element", "kernel", "channel"]), alloc=st.sampled_from(["global", "layer"]),
)  # fmt: skip
def test_property_masks_are_binary_nested_under_hard_and_respect_floor(out, inp, sparsity, gran, alloc):
    net = nn.Sequential(nn.Conv2d(inp, out, 3), nn.Conv2d(out, out, 1))
    p = Pruner(net, PruneConfig(criterion="random", granularity=gran, allocation=alloc, mode="hard"))
    p.prune(sparsity / 2)
    first = [M.get_mask(layer.module).mask.clone() for layer in p.layers]
    p.prune(sparsity)
    for layer, f in zip(p.layers, first):
        m = M.get_mask(layer.module).mask
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert (m <= f).all()  # hard mode: nested
        assert m.sum() >= 1
        if gran != "channel":
            assert (to_canonical(m, layer.module).reshape(m.shape[0], -1).sum(1) >= 1).all()


def test_channels_last_models_prune_and_train():
    net = _net().to(memory_format=torch.channels_last)
    p = Pruner(net, PruneConfig(criterion="taylor", min_density=0, min_per_channel=1))
    net(torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)).sum().backward()
    p.accumulate()
    assert p.prune(0.9) == pytest.approx(0.9, abs=0.01)


def _two_convs():
    """Each weight of the first conv takes part in 64 MACs per 8x8 input, of the second in 16."""
    net = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.Conv2d(4, 4, 1, stride=2, bias=False))
    with torch.no_grad():
        for m in net:
            m.weight.fill_(1.0)  # equal magnitudes: only the cost can separate the layers
    return net


def test_cost_exponent_prunes_the_weights_used_most_first():
    from prunq.cost.measure import count_macs

    net = _two_convs()
    macs = count_macs(net, (torch.zeros(1, 1, 8, 8),))
    assert macs == {"0": 4 * 64, "1": 16 * 16}
    cfg = PruneConfig(criterion="magnitude", mode="hard", min_density=0, min_per_channel=0, cost_exponent=1.0)
    p = Pruner(net, cfg, macs=macs)
    # mean MACs per weight = (256 + 256) / 20 = 25.6: scores x 0.4 in the first conv, x 1.6 in the second
    assert p._cost_scale == pytest.approx({"0": 25.6 / 64, "1": 25.6 / 16})
    p.prune(0.2)  # 4 of 20 weights go: all four of the first conv, whose weights cost 4x more each
    assert (_kept(net[0]), _kept(net[1])) == (0, 16)

    plain = _two_convs()
    Pruner(plain, PruneConfig(criterion="magnitude", mode="hard", min_density=0, min_per_channel=0)).prune(0.2)
    assert _kept(plain[0]) + _kept(plain[1]) == 16 and _kept(plain[0]) > 0  # ties: no preference for cost


def test_cost_exponent_needs_macs():
    with pytest.raises(PrunqError, match="prune.cost_exponent: needs the MACs"):
        Pruner(_two_convs(), PruneConfig(cost_exponent=0.5))
    with pytest.raises(PrunqError, match="prune.cost_exponent"):
        PruneConfig(cost_exponent=-1.0)
