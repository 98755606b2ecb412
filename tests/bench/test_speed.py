"""The speed benchmark's own logic (bench/speed.py): README's Speed section is the committed results'
rendering; the coupling-aware channel pruning it compares against prunes residual channels together and
leaves what escapes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import speed  # noqa: E402

from prunq.prune.structured import remove_channels  # noqa: E402


def test_the_readme_speed_section_is_generated_from_the_committed_results():
    res = json.loads((ROOT / "bench" / "results" / "speed.json").read_text())
    assert speed.readme_section(res) in (ROOT / "README.md").read_text()


class _Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        s = torch.relu(self.bn(self.stem(x)))
        return self.head(torch.relu(s + self.b(torch.relu(self.a(s)))))


def test_channel_pruning_prunes_coupled_channels_together_and_removal_takes_them():
    torch.manual_seed(0)
    m = _Res().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)  # a non-zero shift: pruning must zero the BN channel too
    x = torch.randn(2, 3, 6, 6)
    pruned = speed.channel_prune(m, (x,), 0.5)
    zero = {n: [c for c in range(mod.out_channels) if not mod.weight[c].any()]
            for n, mod in pruned.named_modules() if isinstance(mod, nn.Conv2d)}  # fmt: skip
    assert len(zero["a"]) == 4 and zero["stem"] == zero["b"] and len(zero["stem"]) == 4  # the residual stream
    assert zero["head"] == []  # the output escapes
    r = remove_channels(pruned, (x,))
    assert r.model.stem.out_channels == r.model.b.out_channels == r.model.a.out_channels == 4
    with torch.no_grad():
        assert torch.allclose(pruned(x), r.model(x), atol=1e-5)
