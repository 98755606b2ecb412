import copy
import math
import re

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
    with pytest.warns(UserWarning, match="per-tensor floor"):
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
    assert p.config.sparsity == 1 - n / m
    p.prune(p.config.sparsity)
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


@pytest.mark.filterwarnings("ignore:prune. the per-tensor floor")
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


# -- the config: one definition for the API and the recipe --------------------------------------------
def test_config_contract_defaults():
    c = PruneConfig()
    assert c.model_dump(mode="json") == {
        "kind": "prune", "sparsity": 0.9, "criterion": "taylor", "granularity": "element", "allocation": "global",
        "mode": "soft", "schedule": "gradual", "begin": 0.0, "end": 0.7, "iterations": 5, "frequency": 10,
        "initial_sparsity": 0.0, "min_density": 0.002, "min_per_channel": 1, "exclude": [], "overrides": {},
        "ema": None, "regrow": 0.05, "cost_exponent": 0.0, "score_batches": 8,
        "finetune": {"steps": 500, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9,
                     "lr_schedule": "cosine"},
    }  # fmt: skip
    assert "seed" not in PruneConfig.model_fields


def test_config_is_frozen_hashable_and_round_trips_through_yaml():
    import yaml

    c = PruneConfig(exclude=["fc"], overrides={"conv*": 0.5, "conv1": 0.8}, criterion={"taylor": 0.7, "magnitude": 0.3})
    assert c.exclude == ("fc",)
    assert dict(c.overrides) == {"conv*": 0.5, "conv1": 0.8}
    assert hash(c) == hash(PruneConfig.parse(c.model_dump()))
    with pytest.raises(TypeError):
        c.overrides["x"] = 0.1  # type: ignore[index]
    text = yaml.safe_dump(c.model_dump(mode="json"), sort_keys=False)
    assert "overrides:\n  conv*: 0.5\n  conv1: 0.8" in text  # dumps as a mapping
    assert PruneConfig.parse(yaml.safe_load(text), "recipe.yaml") == c
    assert PruneConfig.parse(c.model_dump()) == c  # the python dump too


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(sparsity=2), "prune.sparsity: 2.0 is outside [0, 1)"),
        (dict(begin=0.8, end=0.5), "prune.end: "),
        (dict(begin=0.9), "prune.end: "),  # end left at its default 0.7
        (dict(criterion="l1"), "prune.criterion: unknown criterion 'l1'"),
        (dict(criterion={"taylor": 1.0, "l1": 1.0}), "prune.criterion: unknown criterion 'l1'"),
        (dict(criterion={"taylor": 0.0}), "prune.criterion: a blend needs at least one weight > 0"),
        (dict(granularity="row"), "prune.granularity: unknown granularity 'row'"),
        (dict(overrides={"fc": 1.0}), "prune.overrides.fc: 1.0 is outside [0, 1)"),
        (dict(initial_sparsity=0.95), "prune.initial_sparsity"),
        (dict(schedule="cubic"), "prune.schedule: unknown schedule 'cubic'"),
        (dict(iterations=0), "prune.iterations"),
        (dict(mode="medium"), "prune.mode"),
        (dict(score_batches=0, finetune={"steps": 0}), "prune.score_batches: the taylor criterion needs gradients"),
        (dict(seed=3), "prune.seed: unknown key"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(kw, message):
    with pytest.raises(PrunqError, match=re.escape(message)):
        PruneConfig(**kw)
    with pytest.raises(PrunqError, match=re.escape(message.removeprefix("prune."))):
        PruneConfig.parse(kw, "recipe.yaml")


def test_a_criterion_without_gradients_needs_no_scoring_pass():
    assert PruneConfig(criterion="magnitude", score_batches=0, finetune={"steps": 0}).score_batches == 0
    assert PruneConfig(criterion={"magnitude": 1, "random": 1}, score_batches=0, finetune={"steps": 0})


# -- N:M (bug a) ----------------------------------------------------------------------------------------
def test_nm_sets_its_sparsity_and_refuses_a_different_one_or_overrides():
    assert PruneConfig(granularity="2:4").sparsity == 0.5
    assert PruneConfig(granularity="1:4", sparsity=0.75).sparsity == 0.75
    assert PruneConfig.parse({"granularity": "2:8"}).sparsity == 0.75
    with pytest.raises(PrunqError, match=r"prune.granularity: 2:4 fixes the sparsity at 0.5, but sparsity is 0.98"):
        PruneConfig(granularity="2:4", sparsity=0.98)
    with pytest.raises(PrunqError, match="prune.overrides: 2:4 fixes the sparsity of every layer"):
        PruneConfig(granularity="2:4", overrides={"0": 0.9})
    p = Pruner(nn.Sequential(nn.Linear(8, 4)), PruneConfig(criterion="magnitude", granularity="2:4"))
    with pytest.raises(PrunqError, match="prune.sparsity: granularity 2:4 fixes the sparsity at 0.5, got 0.98"):
        p.prune(0.98)
    assert p.prune(0.5) == 0.5


def test_nm_schedule_decides_when_blocks_are_reselected():
    net = nn.Sequential(nn.Linear(8, 4, bias=False))
    cfg = PruneConfig(criterion="magnitude", granularity="2:4", schedule="gradual", begin=0.0, end=1.0, frequency=5,
                      mode="hard")  # fmt: skip
    p = Pruner(net, cfg, total_steps=10)  # update steps 0 (target 0: no cut), 5, 10
    cuts = [p.step() for _ in range(11)]
    assert [t for t, c in enumerate(cuts) if c is not None] == [5, 10]
    assert all(c == 0.5 for c in cuts if c is not None)
    assert (M.get_mask(net[0]).mask.reshape(4, 2, 4).sum(-1) == 2).all()


# -- hard mode: masks only shrink (bug b) --------------------------------------------------------------
def test_hard_mode_refuses_a_lower_target_instead_of_reviving():
    net = nn.Sequential(nn.Linear(8, 4))
    p = Pruner(net, PruneConfig(criterion="magnitude", mode="hard", min_density=0, min_per_channel=0))
    p.prune(0.75)
    before = M.get_mask(net[0]).mask.clone()
    with pytest.raises(PrunqError, match="prune.sparsity: 0.25 is below the 0.75 already cut"):
        p.prune(0.25)
    assert torch.equal(M.get_mask(net[0]).mask, before)
    assert p.prune(0.75) == 0.75  # the same target again is fine


def test_frozen_soft_masks_refuse_a_lower_target_too():
    net = nn.Sequential(nn.Linear(8, 4))
    p = Pruner(net, PruneConfig(criterion="magnitude", mode="soft", min_density=0, min_per_channel=0))
    p.prune(0.25)
    p.prune(0.125)  # soft and not frozen: allowed (pruned weights may return)
    p.prune(0.5)
    p.freeze()
    with pytest.raises(PrunqError, match="already cut"):
        p.prune(0.25)


# -- the scoring pass before step 0 (bug c) ------------------------------------------------------------
def test_statistics_gathered_before_step_0_score_the_first_real_cut():
    net = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    cfg = PruneConfig(criterion="taylor", schedule="gradual", begin=0.0, end=1.0, frequency=5, sparsity=0.5,
                      mode="hard", min_density=0, min_per_channel=0)  # fmt: skip
    p = Pruner(net, cfg, total_steps=10)  # update steps 0, 5, 10
    shadow = M.original(net[0])
    shadow.grad = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # the dedicated pass: scores 16, 9, 4, 1
    p.accumulate()
    shadow.grad = None
    assert p.step() is None  # t = 0: the target is 0, nothing to cut, statistics kept
    assert p.criterion.batches_seen("0") == 1
    assert all(p.step() is None for _ in range(4))
    # t = 5: s = 0.5 - 0.5 (1 - 0.5)^3 = 0.4375, keep round(0.5625 * 4) = 2, ranked by the pass's scores
    assert p.step() == 0.5
    assert M.get_mask(net[0]).mask.tolist() == [[1, 1, 0, 0]]


def test_initial_sparsity_cuts_at_begin():
    net = nn.Sequential(nn.Linear(10, 10, bias=False))
    cfg = PruneConfig(criterion="magnitude", schedule="gradual", begin=0.0, end=1.0, frequency=5, sparsity=0.8,
                      initial_sparsity=0.3, mode="hard", min_density=0, min_per_channel=0)  # fmt: skip
    p = Pruner(net, cfg, total_steps=10)
    assert p.step() == pytest.approx(0.3)


# -- frozen shadows stay zero under Adam (bug d) --------------------------------------------------------
def test_frozen_pruned_shadows_stay_exactly_zero_under_adam():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    cfg = PruneConfig(criterion="magnitude", schedule="one_shot", begin=0.0, end=0.5, sparsity=0.5, mode="soft",
                      min_density=0, min_per_channel=0)  # fmt: skip
    p = Pruner(net, cfg, total_steps=20)  # cut at 0, re-select and freeze at 10
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    x = torch.randn(16, 8)
    for _ in range(20):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        p.accumulate()
        opt.step()
        p.step()
    assert p.frozen
    for layer in p.layers:
        pruned = M.get_mask(layer.module).mask == 0
        assert pruned.any()
        assert (M.original(layer.module)[pruned] == 0).all()  # Adam's momentum would have moved them


# -- checkpointing mid-schedule (bug e) ------------------------------------------------------------------
def _train(split_at: int | None):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    cfg = PruneConfig(criterion="taylor", schedule="gradual", begin=0.0, end=0.8, frequency=3, sparsity=0.8,
                      overrides={"2": 0.5}, min_density=0, min_per_channel=0)  # fmt: skip
    net = build()
    p = Pruner(net, cfg, total_steps=20)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    cuts = []
    for t in range(20):
        if t == split_at:  # save, rebuild everything, resume
            saved = (copy.deepcopy(net.state_dict()), copy.deepcopy(p.state_dict()), copy.deepcopy(opt.state_dict()))
            net = build()
            p = Pruner(net, cfg, total_steps=20)
            net.load_state_dict(saved[0])
            p.load_state_dict(saved[1])
            opt = torch.optim.SGD(net.parameters(), lr=0.05)
            opt.load_state_dict(saved[2])
            assert p.state_dict()["pin_scale"] == saved[1]["pin_scale"] < 1
        g = torch.Generator().manual_seed(t)
        opt.zero_grad()
        net(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
        p.accumulate()
        opt.step()
        if p.step() is not None:
            cuts.append((t, p.pin_scale, [M.get_mask(layer.module).mask.clone() for layer in p.layers]))
    return cuts


def test_a_mid_schedule_round_trip_gives_the_same_cuts():
    straight, resumed = _train(None), _train(8)
    assert [(t, s) for t, s, _ in straight] == [(t, s) for t, s, _ in resumed]
    assert len(straight) >= 4
    for (_, _, a), (_, _, b) in zip(straight, resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# -- warnings point at the caller (bug f) ----------------------------------------------------------------
def test_the_floor_warning_points_at_the_caller_of_prune():
    net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    p = Pruner(net, PruneConfig(criterion="magnitude", min_density=0.5, min_per_channel=1))
    with pytest.warns(UserWarning, match="per-tensor floor") as rec:
        p.prune(0.99)
    assert rec[0].filename == __file__


# -- regrow cap, EMA, pin ramp ---------------------------------------------------------------------------
@pytest.mark.parametrize("regrow, returned", [(0.2, 1), (0.5, 3), (None, 5)])
def test_regrow_cap_lets_ceil_regrow_times_kept_groups_return_per_cut(regrow, returned):
    net = nn.Sequential(nn.Linear(10, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.arange(1.0, 11.0).reshape(1, 10))
    p = Pruner(net, PruneConfig(criterion="magnitude", mode="soft", regrow=regrow, min_density=0, min_per_channel=0))
    p.prune(0.5)
    assert M.get_mask(net[0]).mask.tolist() == [[0] * 5 + [1] * 5]
    with torch.no_grad():
        M.original(net[0])[0, :5] = torch.arange(101.0, 106.0)  # every pruned shadow now beats every kept one
    p.prune(0.5)
    mask = M.get_mask(net[0]).mask[0]
    # cap = ceil(regrow * 5 kept): the largest returning shadows displace the smallest kept weights
    assert int(mask[:5].sum()) == returned and mask[5 - returned : 5].all()
    assert int(mask.sum()) == 5


def test_ema_statistics_survive_a_cut():
    net = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
    p = Pruner(net, PruneConfig(criterion="taylor", ema=0.5, mode="soft", min_density=0, min_per_channel=0))
    shadow = M.original(net[0])
    for g in ([1.0, 1.0], [3.0, 1.0]):  # (w g)^2: [1, 4] then [9, 4]
        shadow.grad = torch.tensor([g])
        p.accumulate()
    w = M.original(net[0]).detach()
    assert p.criterion.scores("0", w, p.gran).tolist() == [[5.0, 4.0]]  # 0.5 [1, 4] + 0.5 [9, 4]
    p.prune(0.5)
    assert M.get_mask(net[0]).mask.tolist() == [[1, 0]]
    shadow.grad = torch.zeros(1, 2)
    p.accumulate()
    assert p.criterion.scores("0", w, p.gran).tolist() == [[2.5, 2.0]]  # not reset by the cut


def test_pinned_layers_ramp_with_the_schedule():
    net = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    cfg = PruneConfig(criterion="magnitude", mode="hard", schedule="gradual", begin=0.0, end=1.0, frequency=4,
                      sparsity=0.8, overrides={"0": 0.9}, min_density=0, min_per_channel=0)  # fmt: skip
    p = Pruner(net, cfg, total_steps=12)  # update steps 0 (target 0: no cut), 4, 8, 12
    ramp = []
    for t in range(13):
        target = p.schedule.target(t)
        if p.step() is not None:
            ramp.append(p.pin_scale)
            assert p.pin_scale == pytest.approx(target / 0.8)  # the pinned layer follows the schedule's progress
            assert _kept(net[0]) == round((1 - 0.9 * target / 0.8) * 100)
            assert _kept(net[0]) + _kept(net[1]) == round((1 - target) * 200)
    assert len(ramp) == 3 and ramp == sorted(ramp) and ramp[-1] == 1.0
    assert (_kept(net[0]), _kept(net[1])) == (10, 30)


def test_seed_is_a_pruner_argument():
    def mask(seed):
        net = nn.Sequential(nn.Linear(16, 16))
        p = Pruner(net, PruneConfig(criterion="random", min_density=0, min_per_channel=0), seed=seed)
        p.prune(0.5)
        return M.get_mask(net[0]).mask

    assert torch.equal(mask(1), mask(1))
    assert not torch.equal(mask(1), mask(2))


def test_scores_and_sizes_feed_allocate_without_touching_the_model():
    from prunq.prune.allocate import allocate

    net = _net()
    p = Pruner(net, PruneConfig(criterion="magnitude", granularity="kernel"))
    state = copy.deepcopy(net.state_dict())
    scores, sizes = p.scores(), p.group_sizes()
    cfg = p.config
    policy = dict(min_density=cfg.min_density, min_per_channel=cfg.min_per_channel)
    results = [allocate(scores, sizes, s, **policy) for s in (0.5, 0.9, 0.5)]
    assert all(torch.equal(a, b) for a, b in zip(results[0].values(), results[2].values()))
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])
    p.prune(0.9)
    for layer in p.layers:
        assert torch.equal(p._group_mask(layer), results[1][layer.name])


def test_a_pattern_that_matches_no_layer_is_an_error_naming_it():
    """Issue 10: an override or exclude pattern matching no layer was silently accepted."""
    from torch import nn as _nn

    from prunq.core.errors import PrunqError as _E

    m = _nn.Sequential(_nn.Linear(4, 4), _nn.Linear(4, 2))
    with pytest.raises(_E, match="prune.exclude: pattern 'fc\\*' matches no layer"):
        Pruner(m, PruneConfig(exclude=("fc*",), criterion="magnitude"))
    with pytest.raises(_E, match="prune.overrides: pattern 'conv1' matches no layer"):
        Pruner(m, PruneConfig(overrides={"conv1": 0.5}, criterion="magnitude"))
