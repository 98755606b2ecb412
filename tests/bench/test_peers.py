"""The peers benchmark's own logic (bench/peer_methods.py, bench/peer_report.py): the baselines it builds from plain
torch (cubic GMP with torch.nn.utils.prune, fake-quant QAT) and the analysis that turns rows into claims.
The peers themselves (NNCF, Torch-Pruning, Brevitas) are bench extras and are not needed here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import peer_methods as PM  # noqa: E402
import peer_report as peers  # noqa: E402

from prunq.cost import measure as C  # noqa: E402
from prunq.core.layers import compressible_layers  # noqa: E402
from prunq.pipeline.recipes import Recipe  # noqa: E402
from prunq.tasks import get_task  # noqa: E402


def test_gmp_schedule_by_hand():
    # 100 steps, cut between 10 % and 60 %, to 0.9: s_t = 0.9 * (1 - (1 - (t - 10) / 50)^3)
    spec = Recipe().prune.model_copy(update={"begin": 0.1, "end": 0.6, "frequency": 5})
    s = PM.gmp_schedule(spec, 100, 0.9)
    assert s.target(0) == 0.0
    assert s.target(10) == 0.0
    assert s.target(35) == pytest.approx(0.9 * (1 - 0.5**3))
    assert s.target(60) == pytest.approx(0.9)
    assert s.target(99) == pytest.approx(0.9)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 3, 2, stride=2), nn.Flatten(),
                         nn.Linear(3 * 8 * 8, 5))  # fmt: skip


@pytest.mark.parametrize("wb", [2, 4, 8])
def test_plain_qat_keeps_zeros_and_the_grid(wb):
    model = _tiny()
    masks = {}
    for i in (0, 2, 4):
        m = model[i]
        masks[i] = (torch.rand_like(m.weight) > 0.7).float()
        prune.custom_from_mask(m, "weight", masks[i])
    qat = PM.PlainQAT(model, wb, 8)
    model.train()
    y = model(torch.randn(3, 2, 6, 6))
    y.sum().backward()  # the straight-through estimator reaches the unpruned shadow weights
    assert model[0].weight_orig.grad is not None
    qmax = 2 ** (wb - 1) - 1
    for (name, w), i in zip(qat.effective_weights().items(), (0, 2, 4)):
        assert torch.all(w[masks[i] == 0] == 0), name
        axis = 1 if i == 2 else 0
        dims = [d for d in range(w.dim()) if d != axis]
        orig = model[i].weight_orig * masks[i]
        step = orig.abs().amax(dim=dims, keepdim=True) / qmax
        levels = w / step.clamp_min(1e-12)
        assert torch.allclose(levels, levels.round(), atol=1e-4), name
        assert levels.abs().max() <= qmax + 1e-4


def test_plain_qat_activation_range_is_unsigned_after_relu():
    model = nn.Sequential(nn.ReLU(), nn.Linear(4, 2, bias=False))
    qat = PM.PlainQAT(model, 8, 2)  # 2-bit unsigned inputs: levels 0, s, 2s, 3s with s = max / 3
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    qat.calibrate(model, type("T", (), {"example_inputs": lambda self: (x,)})(), [(x,)])
    seen = {}
    model[1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    model.eval()
    model(torch.tensor([[0.4, 1.6, -1.0, 9.0]]))
    assert torch.equal(seen["x"], torch.tensor([[0.0, 2.0, 0.0, 3.0]]))


def test_gmp_prune_reaches_the_target_exactly_with_hard_masks():
    task = get_task("digits")
    recipe = Recipe().with_(**{"task.name": "digits", "model.name": "digits_cnn", "prune.finetune.steps": 30,
                               "prune.frequency": 5, "prune.end": 0.5, "task.batch_size": 32})  # fmt: skip
    torch.manual_seed(0)
    dense = task.build_model("digits_cnn", width=0.25)
    model = PM.gmp_prune(dense, task, recipe, 0.9)
    layers = [m for _, m in compressible_layers(model)]
    total = sum(m.weight_mask.numel() for m in layers)
    zeros = sum(int((m.weight_mask == 0).sum()) for m in layers)
    assert zeros == round(0.9 * total)
    for m in layers:  # the masked weight is what the layer uses
        assert torch.all(m.weight[m.weight_mask == 0] == 0)
    assert not any(prune.is_pruned(m) for _, m in compressible_layers(dense))  # the input is untouched
    plain = PM.plain_copy(model)
    assert not any(prune.is_pruned(m) for _, m in compressible_layers(plain))
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    plain.eval()
    assert torch.allclose(model(x), plain(x))


def test_measure_weights_counts_removed_channels_as_pruned():
    class T:
        def example_inputs(self):
            return (torch.zeros(1, 4),)

    dense = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Linear(6, 2, bias=False))
    ref = C.measure(dense, T().example_inputs())
    small = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))  # half the hidden channels
    w = {"0": torch.ones(3, 4), "1": torch.ones(2, 3)}
    w["1"][0, 0] = 0.0
    cost = PM.measure_weights(small, w, 4, 8, T(), ref)
    assert cost.nonzeros == 12 + 5
    assert PM.sparsity_against(w, ref.prunable_params) == pytest.approx(1 - 17 / 36)
    # BOPs: layer 0: 12 MACs * 4 * 8, layer 1: 6 MACs * (5/6) * 4 * 8; against dense fp32 (24 + 12) * 1024
    assert cost.bops_ratio == pytest.approx((12 * 32 + 5 * 32) / (36 * 1024))


def _row(tool, s, wb, ab, metric, bops):
    return {"tool": tool, "sparsity": s, "weight_bits": wb, "act_bits": ab, "metric": metric, "bops_ratio": bops}


def test_dominance_by_hand():
    rows = [_row("prunq", 0.9, 4, 8, 0.95, 0.010), _row("prunq", 0.98, 4, 8, 0.90, 0.002),
            _row("A", 0.9, 4, 8, 0.93, 0.011),   # dominated by prunq s0.9 (cheaper and better)
            _row("B", 0.9, 4, 8, 0.97, 0.011),   # better than anything prunq has at <= 0.011
            _row("C", 0.99, 4, 8, 0.50, 0.001)]  # cheaper than every prunq point
    d = {x["tool"]: x for x in peers.dominance(rows, higher=True)}
    assert d["A"]["dominated"] and d["A"]["prunq_point"] == "s0.9 w4a8" and d["A"]["gap"] == pytest.approx(0.02)
    assert not d["B"]["dominated"] and d["B"]["gap"] == pytest.approx(-0.02)
    assert not d["C"]["dominated"] and d["C"]["prunq_point"] is None
    # lower is better (EPE): the same rows read the other way round
    d = {x["tool"]: x for x in peers.dominance(rows, higher=False)}
    assert d["A"]["dominated"] and d["A"]["prunq_metric"] == 0.90 and d["A"]["gap"] == pytest.approx(0.03)
    assert d["B"]["dominated"] and not d["C"]["dominated"]


def test_joint_study_by_hand():
    rows = [_row("prunq", 0.0, 8, 8, 0.99, 1 / 16), _row("prunq", 0.0, 2, 2, 0.60, 1 / 256),
            _row("prunq", 0.9, 8, 8, 0.97, 1 / 100), _row("prunq", 0.9, 4, 4, 0.95, 1 / 300),
            _row("prunq", 0.98, 8, 8, 0.80, 1 / 400), _row("Brevitas", 0.9, 4, 8, 1.0, 1e-9)]
    j = peers.joint_study(rows, higher=True, budgets=[1 / 64, 1 / 256, 1 / 1024])
    assert j[0]["pruning_only_8bit"]["point"] == "s0.9 w8a8" and j[0]["quant_only_dense"]["point"] == "s0 w2a2"
    assert j[0]["joint"]["point"] == "s0.9 w8a8" and j[0]["joint_gain"] == pytest.approx(0.0)
    assert j[1]["joint"]["point"] == "s0.9 w4a4"  # only the joint family has it: +0.15 over 8-bit pruning
    assert j[1]["joint_gain"] == pytest.approx(0.95 - 0.80)
    assert j[2] == {"budget": 1 / 1024, "pruning_only_8bit": None, "quant_only_dense": None, "joint": None,
                    "joint_gain": None}  # fmt: skip


def test_readme_section_is_replaced_in_place(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{peers.README_BEGIN}\nold\n{peers.README_END}\nafter\n")
    res = {"task": "digits", "metric_name": "top1", "higher_is_better": True, "config": {"sparsity": [0.9], "bits": [4, 8], "budgets": [1 / 64]},
           "dense": {"metric": 1.0}, "rows": [_row("prunq", 0.9, 4, 8, 0.95, 0.01) | {"achieved_sparsity": 0.9, "memory_ratio": 0.03},
                                             _row("NNCF", 0.9, 8, 8, 0.9, 0.02) | {"achieved_sparsity": 0.9, "memory_ratio": 0.05}],
           "evidence": []}  # fmt: skip
    peers.analyse(res)
    peers.write_readme([res], readme)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith("after\n") and "old" not in text
    assert "| NNCF | 0.9 | 90.0 % | w8a8 | 90.0 % | ✓ s0.9 w4a8: 95.0 % | 0.05000 | 0.020000 | 8-bit only" in text
    assert "prunq Pareto-dominates **1 of 1** peer points." in text
    bad = tmp_path / "NO.md"
    bad.write_text("no markers")
    with pytest.raises(SystemExit, match="NO.md"):
        peers.write_readme([res], bad)


def test_means_over_seeds_and_the_misses_are_said():
    rows = [_row("prunq", 0.9, 4, 8, 0.95, 0.010) | {"seed": 0}, _row("prunq", 0.9, 4, 8, 0.97, 0.012) | {"seed": 1},
            _row("NNCF", 0.9, 8, 8, 0.97, 0.011) | {"seed": 0}, _row("NNCF", 0.9, 8, 8, 0.99, 0.011) | {"seed": 1}]
    for r in rows:
        r |= {"achieved_sparsity": 0.9, "memory_ratio": 0.03}
    res = {"task": "digits", "metric_name": "top1", "higher_is_better": True, "seeds": [0, 1], "rows": rows,
           "config": {"sparsity": [0.9], "bits": [4, 8], "budgets": [1 / 64]}, "dense": {"metric": 1.0}}  # fmt: skip
    peers.analyse(res)
    prunq, nncf = res["rows"]
    assert prunq["metric"] == pytest.approx(0.96) and prunq["bops_ratio"] == pytest.approx(0.011)
    assert prunq["metric_seeds"] == [0.95, 0.97] and prunq["n_seeds"] == 2 and "seed" not in prunq
    assert len(res["rows_per_seed"]) == 4
    (x,) = res["dominance"]  # NNCF's mean 98 % at 0.011 vs prunq's mean 96 % at 0.011: not dominated, by 2 points
    assert not x["dominated"] and x["gap"] == pytest.approx(-0.02)
    (line,) = peers.dominance_summary(res)
    assert "**0 of 1**" in line and "NNCF s=0.9 w8a8 (98.0 % vs prunq's s0.9 w4a8 96.0 %: 2.0 pt better" in line
    assert "| prunq | 0.9 | 90.0 % | w4a8 | 96.0 % (95.0 %–97.0 %) |" in "\n".join(peers.tool_table(res))
