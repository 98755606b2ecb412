import torch
from torch import nn

from prunq.prune import masks as M


def test_state_dict_keys_are_stable_and_bake_keeps_parameter_object():
    lin = nn.Linear(3, 2)
    M.attach_mask(lin)
    assert set(lin.state_dict()) == {"bias", "parametrizations.weight.original", "parametrizations.weight.0.mask"}
    M.set_mask(lin, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    param = lin.parametrizations.weight.original
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    M.bake(lin)
    assert lin.weight is param  # the optimizer still holds the right tensor
    assert opt.param_groups[0]["params"][1] is lin.weight or opt.param_groups[0]["params"][0] is lin.weight
    assert int((lin.weight == 0).sum()) == 3


def test_sparsity_counts_masked_tensors():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    M.attach_mask(net[0])
    M.set_mask(net[0], torch.eye(4))
    assert M.sparsity(net) == 0.75
