"""Granularities: the registry, group geometry by hand, and N:M block selection on awkward layers."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.core.layers import to_canonical
from prunq.prune import masks as M
from prunq.prune.granularity import GRANULARITIES, NM, Channel, Element, Granularity, Kernel, register_granularity
from prunq.prune.pruner import PruneConfig, Pruner


def test_registry_parses_every_name_and_nm_text():
    assert set(GRANULARITIES) >= {"element", "kernel", "channel", "n:m"}
    assert Granularity.parse("element") == Element()
    assert Granularity.parse("kernel") == Kernel()
    assert Granularity.parse("channel") == Channel()
    assert Granularity.parse(" 2 : 4 ") == NM(2, 4)
    assert [str(Granularity.parse(t)) for t in ("element", "kernel", "channel", "3:8")] == [
        "element", "kernel", "channel", "3:8"
    ]  # fmt: skip
    assert Granularity.parse(NM(1, 4)) == NM(1, 4)
    with pytest.raises(PrunqError, match="prune.granularity: unknown granularity 'row'"):
        Granularity.parse("row")
    with pytest.raises(PrunqError, match="prune.granularity: N:M needs 0 < N < M, got 4:4"):
        Granularity.parse("4:4")


def test_a_new_granularity_is_one_registered_class():
    @register_granularity
    @dataclass(frozen=True)
    class Row(Granularity):
        """The kernel rows of one (out, in) pair (a 2-D conv's ``k`` row): groups over the last dim."""

        name: ClassVar[str] = "row-test"
        group_dims: ClassVar[int | None] = 3

    try:
        assert Granularity.parse("row-test") == Row()
        assert PruneConfig(granularity="row-test").gran == Row()
        net = nn.Sequential(nn.Conv2d(2, 2, 3))
        p = Pruner(net, PruneConfig(criterion="magnitude", granularity="row-test", min_density=0, min_per_channel=0))
        p.prune(0.5)
        rows = M.get_mask(net[0]).mask.sum(-1)
        assert set(rows.unique().tolist()) <= {0.0, 3.0} and int(rows.sum()) == 18
    finally:
        del GRANULARITIES["row-test"]


def test_group_geometry_by_hand():
    canon = (2, 3, 2, 2)
    x = torch.arange(24, dtype=torch.float).reshape(canon)
    assert Element().group_shape(canon) == canon and torch.equal(Element().reduce_sum(x), x)
    assert Kernel().group_shape(canon) == (2, 3)
    assert Kernel().reduce_sum(x)[0].tolist() == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9 + 10 + 11]
    assert Channel().reduce_sum(x).tolist() == [sum(range(12)), sum(range(12, 24))]
    assert torch.allclose(Kernel().reduce_norm(x)[0, 0], torch.tensor(14.0).sqrt())  # sqrt(0 + 1 + 4 + 9)
    assert torch.equal(Element().reduce_norm(-x), x)
    assert Channel().group_sizes(canon).tolist() == [12, 12]
    assert Kernel().group_sizes(canon).tolist() == [[4, 4, 4], [4, 4, 4]]
    assert int(Kernel().expand(torch.tensor([[1, 0, 1], [0, 0, 1]]), canon).sum()) == 3 * 4
    assert Channel().expand(torch.tensor([True, False]), canon).sum() == 12
    m = torch.zeros(canon)
    m[1, 2, 0, 1] = 1
    assert Kernel().group_mask(m).tolist() == [[False] * 3, [False, False, True]]
    assert Channel().group_mask(m).tolist() == [False, True]


def test_nm_block_selection_by_hand_with_a_ragged_input_dimension():
    nm = NM(2, 4)
    # one output, cin = 6: blocks [5, 1, 4, 2] and the short [3, 6] (padded with -inf)
    s = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 6.0]])
    assert nm.block_mask(s).int().tolist() == [[1, 0, 1, 0, 1, 1]]
    s = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0]])  # cin = 5: the short block has one weight, kept
    assert nm.block_mask(s).int().tolist() == [[1, 0, 1, 0, 1]]
    # -inf (hard-pruned, or over the regrow cap) is never kept, even when the block has room
    s = torch.tensor([[float("-inf"), float("-inf"), float("-inf"), 1.0]])
    assert nm.block_mask(s).int().tolist() == [[0, 0, 0, 1]]
    assert nm.fixed_sparsity == 0.5 and NM(1, 4).fixed_sparsity == 0.75


def _blocks_ok(mask_canon: torch.Tensor, n: int, m: int) -> bool:
    out, cin, *k = mask_canon.shape
    per_k = mask_canon.reshape(out, cin, -1).transpose(1, 2)  # (out, K, cin)
    full = cin // m * m
    ok = bool((per_k[..., :full].reshape(out, per_k.shape[1], -1, m).sum(-1) == n).all())
    if full < cin:
        ok &= bool((per_k[..., full:].sum(-1) == min(n, cin - full)).all())
    return ok


@pytest.mark.parametrize(
    "layer",
    [nn.Conv2d(6, 4, 3), nn.Linear(10, 3), nn.ConvTranspose2d(8, 6, 2), nn.ConvTranspose2d(8, 6, 3, groups=2),
     nn.Conv1d(8, 4, 3, groups=2)],
    ids=["conv-ragged", "linear-ragged", "convT", "convT-grouped", "conv1d-grouped"],
)  # fmt: skip
def test_nm_blocks_run_along_the_canonical_input_dimension(layer):
    net = nn.Sequential(layer)
    p = Pruner(net, PruneConfig(criterion="magnitude", granularity="2:4"))
    p.prune(0.5)
    assert _blocks_ok(to_canonical(M.get_mask(layer).mask, layer), 2, 4)


def test_nm_leaves_a_depthwise_conv_dense():
    dw = nn.Conv2d(8, 8, 3, groups=8)  # canonical (8, 1, 3, 3): one real weight per block of 4
    pw = nn.Conv2d(8, 8, 1)
    p = Pruner(nn.Sequential(dw, pw), PruneConfig(criterion="magnitude", granularity="2:4"))
    p.prune(0.5)
    assert p.densities() == {"0": 1.0, "1": 0.5}
    assert p.sparsity() == pytest.approx(0.5 * 64 / (72 + 64))  # below 1 - N/M, as documented


def test_nm_hard_mode_recut_keeps_the_same_blocks():
    net = nn.Sequential(nn.Linear(8, 4))
    p = Pruner(net, PruneConfig(criterion="magnitude", granularity="2:4", mode="hard"))
    p.prune(0.5)
    before = M.get_mask(net[0]).mask.clone()
    with torch.no_grad():
        M.original(net[0]).copy_(torch.randn(4, 8) * 100)  # cannot bring a pruned weight back
    p.prune(0.5)
    assert torch.equal(M.get_mask(net[0]).mask, before)


def test_nm_soft_reselection_swaps_within_blocks_up_to_the_regrow_cap():
    net = nn.Sequential(nn.Linear(8, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]]))
    p = Pruner(net, PruneConfig(criterion="magnitude", granularity="2:4", regrow=0.25))
    p.prune(0.5)
    assert M.get_mask(net[0]).mask.tolist() == [[0, 0, 1, 1, 0, 0, 1, 1]]
    with torch.no_grad():
        M.original(net[0])[0, [0, 4]] = 10.0  # one pruned weight per block now beats everything
    p.prune(0.5)
    # cap = ceil(0.25 * 4 kept) = 1: only the first (ties: lower index) returns, in its own block
    assert M.get_mask(net[0]).mask.tolist() == [[1, 0, 0, 1, 0, 0, 1, 1]]
