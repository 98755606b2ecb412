"""allocate(): a pure function from group scores to group masks, checked by hand and by properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunq.core.errors import PrunqError
from prunq.prune.allocate import allocate, floor

INF = float("-inf")


def _ones(*shape):
    return torch.ones(*shape, dtype=torch.int64)


def test_global_ranking_by_hand():
    scores = {"a": torch.tensor([[9.0, 1.0], [8.0, 2.0]]), "b": torch.tensor([[7.0, 3.0, 6.0, 4.0]])}
    sizes = {"a": _ones(2, 2), "b": _ones(1, 4)}
    keep = allocate(scores, sizes, 0.5, min_density=0, min_per_channel=0)  # keep 4 of 8: 9, 8, 7, 6
    assert keep["a"].tolist() == [[True, False], [True, False]]
    assert keep["b"].tolist() == [[True, False, True, False]]
    assert list(keep) == ["a", "b"]


def test_layer_allocation_and_pins_by_hand():
    scores = {"a": torch.tensor([[9.0, 1.0, 8.0, 2.0]]), "b": torch.tensor([[7.0, 3.0, 6.0, 4.0]])}
    sizes = {"a": _ones(1, 4), "b": _ones(1, 4)}
    keep = allocate(scores, sizes, 0.5, allocation="layer", min_density=0, min_per_channel=0)
    assert keep["a"].tolist() == [[True, False, True, False]] and keep["b"].tolist() == [[True, False, True, False]]
    # global with "b" pinned at 0.75: b keeps its best 1, the other 3 of the 4-weight budget go to "a"
    keep = allocate(scores, sizes, 0.5, pins={"b": 0.75}, min_density=0, min_per_channel=0)
    assert keep["b"].tolist() == [[True, False, False, False]]
    assert keep["a"].tolist() == [[True, False, True, True]]


def test_group_sizes_count_against_the_budget():
    # two channels of 6 weights and one of 2: keeping half of 14 = 7 weights fits one 6-channel only
    scores = {"c": torch.tensor([3.0, 2.0, 1.0])}
    keep = allocate(scores, {"c": torch.tensor([6, 6, 2])}, 0.5, min_density=0, min_per_channel=0,
                    channel_granularity=True)  # fmt: skip
    assert keep["c"].tolist() == [True, False, False]  # greedy by score: stops at the first that does not fit


@pytest.mark.filterwarnings("ignore:prune. the per-tensor floor")
def test_floor_by_hand():
    s = torch.tensor([[1.0, 5.0, 2.0], [0.1, 0.2, 0.3]])
    z = _ones(2, 3)
    assert floor(s, z, min_density=0, min_per_channel=1, channel_granularity=False).tolist() == [
        [False, True, False], [False, False, True]
    ]  # fmt: skip
    # ceil(0.5 * 6) = 3 weights: the two per-channel picks, then the best remaining (2.0)
    assert floor(s, z, min_density=0.5, min_per_channel=1, channel_granularity=False).tolist() == [
        [False, True, True], [False, False, True]
    ]  # fmt: skip
    assert floor(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([4, 4, 4]), min_density=0, min_per_channel=1,
                 channel_granularity=True).tolist() == [False, True, False]  # fmt: skip
    keep = allocate({"x": s}, {"x": z}, 0.99, min_density=0, min_per_channel=1)
    assert keep["x"].sum(1).tolist() == [1, 1]  # the floor beats the budget (with a warning)


def test_minus_inf_is_kept_only_when_forced():
    s = torch.tensor([[4.0, INF, INF, INF]])
    keep = allocate({"x": s}, {"x": _ones(1, 4)}, 0.25, min_density=0, min_per_channel=0)
    assert keep["x"].tolist() == [[True, False, False, False]]  # the budget allows 3, only 1 may be kept
    s = torch.tensor([[INF, INF], [1.0, 2.0]])
    keep = allocate({"x": s}, {"x": _ones(2, 2)}, 0.5, min_density=0, min_per_channel=1)
    assert keep["x"].tolist() == [[True, False], [False, True]]  # the per-channel floor forces one -inf


def test_the_config_schema_lists_every_registered_allocation():
    from prunq.prune.allocate import ALLOCATIONS, ALLOCATORS

    assert set(ALLOCATIONS) == set(ALLOCATORS)


def test_unknown_allocation_is_an_error():
    with pytest.raises(PrunqError, match="prune.allocation: unknown allocation 'balanced'"):
        allocate({"x": torch.ones(1, 2)}, {"x": _ones(1, 2)}, 0.5, allocation="balanced")


def test_a_search_calls_it_many_times_deterministically_without_side_effects():
    g = torch.Generator().manual_seed(0)
    scores = {f"l{i}": torch.rand(8, 16, generator=g) for i in range(4)}
    sizes = {k: _ones(8, 16) for k in scores}
    frozen = {k: v.clone() for k, v in scores.items()}
    first = allocate(scores, sizes, 0.9)
    for trial in range(200):  # e.g. an evolutionary search over blend weights and budgets
        w = torch.rand(1, generator=g).item()
        allocate({k: v * (1 + w * i) for i, (k, v) in enumerate(scores.items())}, sizes, 0.5 + 0.4 * w)
    again = allocate(scores, sizes, 0.9)
    assert all(torch.equal(first[k], again[k]) for k in scores)
    assert all(torch.equal(scores[k], frozen[k]) for k in scores)  # inputs untouched


@st.composite
def _problem(draw):
    n_layers = draw(st.integers(1, 3))
    channel = draw(st.booleans())
    scores, sizes = {}, {}
    for i in range(n_layers):
        out = draw(st.integers(1, 6))
        shape = (out,) if channel else (out, draw(st.integers(1, 6)))
        vals = draw(st.lists(st.one_of(st.floats(0, 10), st.just(INF)), min_size=math.prod(shape),
                             max_size=math.prod(shape)))  # fmt: skip
        scores[f"l{i}"] = torch.tensor(vals, dtype=torch.float32).reshape(shape)
        group = draw(st.integers(1, 9)) if channel else 1
        sizes[f"l{i}"] = torch.full(shape, group, dtype=torch.int64)
    pins = {k: draw(st.floats(0, 0.99)) for k in scores if draw(st.booleans())}
    return scores, sizes, channel, pins


@pytest.mark.filterwarnings("ignore:prune. the per-tensor floor")
@settings(max_examples=150, deadline=None)
@given(
    problem=_problem(), sparsity=st.floats(0, 0.99), allocation=st.sampled_from(["global", "layer"]),
    min_density=st.floats(0, 0.3), min_per_channel=st.integers(0, 3),
)  # fmt: skip
def test_property_binary_floor_and_budget(problem, sparsity, allocation, min_density, min_per_channel):
    scores, sizes, channel, pins = problem
    policy = dict(min_density=min_density, min_per_channel=min_per_channel, channel_granularity=channel)
    keep = allocate(scores, sizes, sparsity, allocation=allocation, pins=pins, **policy)
    assert list(keep) == list(scores)
    forced_total = 0
    for name, k in keep.items():
        s, z = scores[name], sizes[name]
        assert k.dtype == torch.bool and k.shape == s.shape
        forced = floor(s, z, min_density=min_density, min_per_channel=min_per_channel, channel_granularity=channel)
        assert (k | ~forced).all()  # the floor holds ...
        assert int(z[k].sum()) >= math.ceil(min_density * int(z.sum()))
        if not channel:
            assert (k.sum(1) >= min(min_per_channel, k.shape[1])).all()
        elif min_per_channel > 0:
            assert k.any()
        assert not (k & torch.isneginf(s) & ~forced).any()  # ... and -inf is kept only when forced
        forced_total += int(z[forced].sum())
        if allocation == "layer" or name in pins:
            target = pins.get(name, sparsity)
            assert int(z[k].sum()) <= round((1 - target) * int(z.sum())) + int(z[forced].sum())
    total = sum(int(z.sum()) for z in sizes.values())
    kept = sum(int(sizes[n][k].sum()) for n, k in keep.items())
    if allocation == "global":
        pinned_budget = sum(round((1 - pins[n]) * int(sizes[n].sum())) for n in pins)
        assert kept <= max(round((1 - sparsity) * total), pinned_budget) + forced_total
    again = allocate(scores, sizes, sparsity, allocation=allocation, pins=pins, **policy)
    assert all(torch.equal(again[n], keep[n]) for n in keep)  # deterministic
