"""prunq.core.layers: which layers are compressible, the canonical weight view, and MACs of one forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunq.core.layers import (
    canonical_shape,
    compressible_layers,
    forward_macs,
    from_canonical,
    is_unbatched_input,
    matches,
    to_canonical,
)


def _macs(layer: nn.Module, x: torch.Tensor) -> int:
    return forward_macs(layer, x, layer(x))


def test_compressible_layers_and_patterns():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 2, 2), nn.Flatten(), nn.Linear(8, 2))
    assert [n for n, _ in compressible_layers(m)] == ["0", "2", "4"]
    assert [n for n, _ in compressible_layers(m, exclude=("2", "4*"))] == ["0"]
    assert matches("layer1.conv1", ["*.conv1"]) and not matches("conv1", ["*.conv1"])


@pytest.mark.parametrize(
    "layer",
    [nn.Conv2d(4, 6, 3, groups=2), nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ConvTranspose1d(3, 5, 2), nn.Linear(3, 7)],
)
def test_canonical_view_round_trip(layer):
    c = to_canonical(layer.weight, layer)
    assert tuple(c.shape) == canonical_shape(layer)
    assert c.shape[0] == (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)
    assert torch.equal(from_canonical(c, layer), layer.weight)


def test_forward_macs_is_the_whole_forward():
    conv = nn.Conv2d(4, 2, 3)
    one = _macs(conv, torch.zeros(1, 4, 5, 5))
    assert one == 2 * 3 * 3 * 4 * 9 == 648
    assert _macs(conv, torch.zeros(3, 4, 5, 5)) == 3 * one
    assert _macs(conv, torch.zeros(4, 5, 5)) == one  # unbatched: one sample, whatever C is
    lin = nn.Linear(6, 5)
    # (B, T, D), (T, B, D) and (B*T, D) hold the same products
    layouts = [torch.zeros(3, 7, 6), torch.zeros(7, 3, 6), torch.zeros(21, 6)]
    assert [_macs(lin, x) for x in layouts] == [21 * 30] * 3


def test_forward_macs_grouped_and_transposed():
    assert _macs(nn.Conv2d(4, 6, 3, groups=2, padding=1), torch.zeros(1, 4, 5, 5)) == 6 * 25 * 2 * 9
    assert _macs(nn.Conv2d(6, 6, 3, groups=6), torch.zeros(2, 6, 4, 4)) == 2 * 6 * 4 * 9  # depthwise
    # ConvTranspose: each input element x out/groups x prod(kernel) (review spot-check 6: 1536)
    assert _macs(nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), torch.zeros(1, 8, 4, 4)) == 1536
    assert _macs(nn.ConvTranspose1d(3, 4, 3), torch.zeros(3, 10)) == 30 * 4 * 3  # unbatched


def test_forward_macs_reads_the_stored_weight_under_a_parametrization():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    lin = nn.Linear(4, 3)
    parametrize.register_parametrization(lin, "weight", Double())
    assert _macs(lin, torch.zeros(2, 4)) == 2 * 12


def test_is_unbatched_input():
    assert is_unbatched_input(nn.Conv2d(4, 2, 3), torch.zeros(4, 5, 5))
    assert not is_unbatched_input(nn.Conv2d(4, 2, 3), torch.zeros(1, 4, 5, 5))
    assert is_unbatched_input(nn.ConvTranspose1d(3, 4, 3), torch.zeros(3, 10))
    assert is_unbatched_input(nn.Linear(6, 5), torch.zeros(6))
    assert not is_unbatched_input(nn.Linear(6, 5), torch.zeros(7, 6))  # ambiguous: (B, D) or (T, D)
