"""Adding a method is one config + one module + one registration: a method defined in this file only runs
through ``prunq.compress``, ``run_sweep``, ``prunq.load`` and the CLI, and its transform changes tensor
shapes yet loads."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
import torch
import yaml
from torch import nn

import prunq
from prunq.cli import main
from prunq.core.config import MethodConfig
from prunq.core.errors import PrunqError
from prunq.core.manifest import register_transform
from prunq.core.method import MethodBase, RunContext, Transform, build_method, config_type, register_method
from prunq.pipeline.recipes import parse_recipe

from tests._tiny import TINY

# ---------------------------------------------------------------------------------------------------
# The plug-in: a retraining-free low-rank factorisation of one Linear layer (it changes tensor shapes).
# ---------------------------------------------------------------------------------------------------


class LowRankConfig(MethodConfig):
    kind: Literal["lowrank-test"] = "lowrank-test"
    layer: str = "classifier"
    rank: int = 4


def _factor_shell(linear: nn.Linear, rank: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(linear.in_features, rank, bias=False), nn.Linear(rank, linear.out_features))


@register_method(LowRankConfig)
class LowRank(MethodBase):
    stage = "lowrank"

    def attach(self, model: nn.Module, ctx: RunContext) -> None:
        parent, _, child = self.config.layer.rpartition(".")
        lin = model.get_submodule(self.config.layer)
        u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        r = self.config.rank
        shell = _factor_shell(lin, r)
        with torch.no_grad():
            shell[0].weight.copy_(vh[:r] * s[:r, None])
            shell[1].weight.copy_(u[:, :r])
            shell[1].bias.copy_(lin.bias)
        setattr(model.get_submodule(parent), child, shell)

    def finalize(self, model: nn.Module, ctx: RunContext) -> list[Transform]:
        return [Transform("lowrank-test", {"layer": self.config.layer, "rank": self.config.rank})]


@register_transform("lowrank-test")
def _replay(model: nn.Module, entry: dict[str, Any]) -> None:
    parent, _, child = entry["layer"].rpartition(".")
    setattr(model.get_submodule(parent), child, _factor_shell(model.get_submodule(entry["layer"]), entry["rank"]))


def _recipe() -> dict:
    r = {k: v for k, v in TINY.items() if k not in ("prune", "quant")}
    return {**r, "methods": [{"kind": "lowrank-test", "layer": "classifier", "rank": 4},
                             {"kind": "prune", **TINY["prune"]}, {"kind": "quantize", **TINY["quant"]}]}  # fmt: skip


def _classifier_name() -> str:
    m = prunq.get_task("digits").build_model("digits_cnn", width=0.5)
    return [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)][-1]


# ---------------------------------------------------------------------------------------------------


def test_registry_dispatches_on_the_config_type():
    assert config_type("lowrank-test") is LowRankConfig
    assert type(build_method(LowRankConfig())) is LowRank
    with pytest.raises(PrunqError, match="unknown method kind 'nope'"):
        config_type("nope")


def test_recipe_methods_are_a_discriminated_union():
    r = parse_recipe(_recipe())
    assert [type(m).__name__ for m in r.methods] == ["LowRankConfig", "PruneConfig", "QuantConfig"]
    dumped = r.model_dump(mode="json")["methods"]
    assert dumped[0] == {"kind": "lowrank-test", "finetune": dumped[0]["finetune"], "layer": "classifier", "rank": 4}
    assert parse_recipe(r.model_dump(mode="json")) == r  # the resolved recipe round-trips
    with pytest.raises(PrunqError, match=r"lowrank-test\.rank"):
        parse_recipe({"methods": [{"kind": "lowrank-test", "rank": "x"}]})
    with pytest.raises(PrunqError, match=r"methods\.1\.rank"):  # two of a kind: named by position
        parse_recipe({"methods": [{"kind": "lowrank-test"}, {"kind": "lowrank-test", "rank": "x"}]})
    with pytest.raises(PrunqError, match="either methods"):
        parse_recipe({"methods": [], "prune": {}})


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory):
    layer = _classifier_name()
    data = _recipe()
    data["methods"][0]["layer"] = layer
    tmp = tmp_path_factory.mktemp("plugin")
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp / "run"
    assert main(["compress", str(path), "--out", str(out), "--quiet"]) == 0
    return layer, path, out


def test_a_plugin_method_runs_through_the_cli_and_loads(plugin_run):
    layer, _, out = plugin_run
    manifest = json.loads((out / "model.json").read_text())
    assert [t["op"] for t in manifest["transforms"]] == ["lowrank-test", "mask", "fold_bn", "quantize"]
    m = json.loads((out / "metrics.json").read_text())
    assert [s["name"] for s in m["stages"]] == ["lowrank", "prune", "quant"]
    # the factor layers exist, are pruned and quantized, and the shapes changed
    assert {f"{layer}.0", f"{layer}.1"} <= {lc["name"] for lc in m["layers"]}
    model = prunq.load(out)
    assert model.get_submodule(f"{layer}.0").weight.shape == (4, model.get_submodule(f"{layer}.0").in_features)
    task = prunq.get_task("digits")
    assert task.evaluate(model)["metric"] == m["compressed"]["metric"]


def test_a_plugin_method_runs_through_the_api_and_the_sweep(plugin_run, tmp_path):
    from prunq.pipeline.sweep import run_sweep

    layer, path, _ = plugin_run
    recipe = prunq.load_recipe(path)
    task = prunq.get_task("digits")
    model = task.build_model("digits_cnn", width=0.5)
    res = prunq.compress(model, task, recipe, quiet=True)
    assert res.manifest["model"]["origin"] == "user"
    prunq.save(res, tmp_path / "api")
    with pytest.raises(PrunqError, match="pass a fresh instance"):
        prunq.load(tmp_path / "api")
    loaded = prunq.load(tmp_path / "api", model=task.build_model("digits_cnn", width=0.5))
    assert task.evaluate(loaded)["metric"] == res.metrics["compressed"]["metric"]

    rows, _ = run_sweep(recipe, [0.8], [(4, 8), (8, 8)], tmp_path / "sweep", quiet=True, render=False)
    assert [(r["weight_bits"], r["act_bits"]) for r in rows] == [(4, 8), (8, 8)]
    point = prunq.load(tmp_path / "sweep" / rows[0]["run"])
    assert isinstance(point.get_submodule(layer), nn.Sequential)
