"""Shared (tied) weights: detection, and the pruner compressing a shared tensor once for every user."""

import pytest
import torch
from torch import nn

from prunq.core.errors import PrunqError
from prunq.core.sharing import parameter_holders, shared_weight_users, stored_weight
from prunq.prune import masks as M
from prunq.prune.pruner import PruneConfig, Pruner


class TinyLM(nn.Module):
    """Embedding tied to the LM head, with a hidden Linear in between."""

    def __init__(self, vocab: int = 12, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(tokens))))


def _names(groups):
    return sorted(sorted(n for n, _ in users) for users in groups.values())


def test_shared_weight_users_finds_tied_modules_parametrized_or_not():
    lm = TinyLM()
    assert _names(shared_weight_users(lm)) == [["embed", "head"]]
    M.attach_mask(lm.head)  # the Parameter now lives in head.parametrizations.weight.original
    assert stored_weight(lm.head) is lm.embed.weight
    assert _names(shared_weight_users(lm)) == [["embed", "head"]]


def test_no_sharing_and_one_module_under_two_names_are_not_shared():
    conv = nn.Conv2d(2, 2, 1)
    net = nn.Sequential(conv, nn.ReLU(), conv, nn.Linear(2, 2))  # the same module twice is one user
    assert shared_weight_users(net) == {}
    assert shared_weight_users(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) == {}


def test_parameter_holders_names_parametrized_weights_by_their_module():
    lm = TinyLM()
    M.attach_mask(lm.head)
    assert sorted(parameter_holders(lm)[id(lm.embed.weight)]) == ["embed.weight", "head.weight"]


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("gran", ["element", "channel"])
def test_tied_embedding_and_head_are_pruned_once_and_consistently(mode, gran):
    lm = TinyLM()
    table = lm.embed.weight.detach().clone()
    p = Pruner(lm, PruneConfig(criterion="magnitude", granularity=gran, mode=mode, min_density=0, min_per_channel=1))
    assert [layer.name for layer in p.layers] == ["hidden", "head"]  # one entry for the shared tensor
    assert M.get_mask(lm.embed) is M.get_mask(lm.head)  # the same Mask instance
    p.prune(0.5)
    mask = M.get_mask(lm.head).mask
    assert 0 < int(mask.sum()) < mask.numel()
    assert torch.equal(lm.embed.weight, lm.head.weight)  # both users see mask * W
    assert (lm.embed.weight[mask == 0] == 0).all()
    kept = mask != 0
    assert torch.equal(lm.embed.weight[kept], table[kept])  # the embedding kept its unpruned entries
    p.freeze()
    assert torch.equal(lm.embed.weight, lm.head.weight)
    assert torch.equal(lm.embed.weight[kept], table[kept])
    lm(torch.tensor([[1, 2, 3]])).sum().backward()  # both users train through the one Parameter
    assert stored_weight(lm.head).grad is not None


def test_a_shared_tensor_counts_once_in_the_sparsity():
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))
    net[1].weight = net[0].weight
    p = Pruner(net, PruneConfig(criterion="magnitude", mode="hard", min_density=0, min_per_channel=0))
    assert [layer.name for layer in p.layers] == ["0", "2"]
    assert M.get_mask(net[0]) is M.get_mask(net[1])
    p.prune(0.5)  # 24 weights, not 40: keep 12
    assert sum(int(M.get_mask(net[i]).mask.sum()) for i in (0, 2)) == 12
    assert p.sparsity() == pytest.approx(0.5)
    assert M.sparsity(net) == pytest.approx(0.5)
    assert torch.equal(net[0].weight, net[1].weight)


def test_an_override_on_either_user_pins_the_shared_tensor():
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    net[1].weight = net[0].weight
    p = Pruner(net, PruneConfig(criterion="magnitude", overrides={"1": 0.75}, min_density=0, min_per_channel=0))
    assert [layer.pin for layer in p.layers] == [0.75, None]


def test_sharers_in_different_layouts_are_refused_naming_both():
    net = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ConvTranspose2d(4, 4, 3))
    net[1].weight = net[0].weight  # same shape (4, 4, 3, 3), but read as (in, out) by the transpose
    with pytest.raises(PrunqError, match=r"'0' \(Conv2d\) and '1' \(ConvTranspose2d\)"):
        Pruner(net, PruneConfig(criterion="magnitude"))


def test_excluding_one_user_of_a_shared_weight_is_refused():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    net[1].weight = net[0].weight
    with pytest.raises(PrunqError, match="prune.exclude: '0' and '1' share one weight"):
        Pruner(net, PruneConfig(criterion="magnitude", exclude=("1",)))
    p = Pruner(net, PruneConfig(criterion="magnitude", exclude=("0", "1")))  # both excluded: fine
    assert [layer.name for layer in p.layers] == ["2"]
    assert M.get_mask(net[0]) is None and M.get_mask(net[1]) is None


def test_a_user_that_holds_the_weight_under_another_name_is_refused():
    class Head(nn.Module):
        def __init__(self, table: nn.Parameter) -> None:
            super().__init__()
            self.table = table

    lin = nn.Linear(4, 4)
    net = nn.ModuleDict({"lin": lin, "head": Head(lin.weight)})
    with pytest.raises(PrunqError, match="also held as 'head.table'"):
        Pruner(net, PruneConfig(criterion="magnitude"))
