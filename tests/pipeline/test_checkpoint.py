"""Work directories and resume (issue 10): JSON + tensor packing, the directory's rules, and compress()
interrupted at chosen moments then resumed — the same weights and metrics as an uninterrupted run."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch

from prunq.core.config import MethodConfig, TrainConfig
from prunq.core.errors import PrunqError
from prunq.core.method import MethodBase, register_method
from prunq.pipeline.checkpoint import WorkDir, pack, unpack, work_dir_for
from prunq.pipeline.recipes import parse_recipe
from prunq.pipeline.run import compress
from prunq.tasks import get_task

from tests._tiny import TINY


def test_pack_and_unpack_round_trip_an_optimizer_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    tensors: dict[str, torch.Tensor] = {}
    packed = pack(opt.state_dict(), tensors, "opt")
    json.dumps(packed)  # plain JSON: integer keys and tuples are encoded, tensors moved out
    back = unpack(json.loads(json.dumps(packed)), tensors)
    fresh = torch.optim.Adam(model.parameters(), lr=0.1)
    fresh.load_state_dict(back)
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match="cannot checkpoint a set"):
        pack({"x": {1, 2}}, {}, "p")


def test_an_existing_work_directory_needs_resume_the_same_recipe_and_must_be_prunqs(tmp_path):
    out = tmp_path / "run"
    work = WorkDir.open(out, "recipe A", command="compress", resume=False, every=5)
    assert work.path == work_dir_for(out) == tmp_path / "run.work" and not work.resumed
    with pytest.raises(PrunqError, match=r"run\.work: an unfinished run of this --out is kept there; pass --resume"):
        WorkDir.open(out, "recipe A", command="compress", resume=False, every=5)
    with pytest.raises(PrunqError, match="of a different recipe"):
        WorkDir.open(out, "recipe B", command="compress", resume=True, every=5)
    with pytest.raises(PrunqError, match="of a different recipe"):
        WorkDir.open(out, "recipe A", command="sweep", resume=True, every=5)
    (work.path / ".step.safetensors.tmp-0123abcd").write_bytes(b"half")  # a writer killed mid-file
    again = WorkDir.open(out, "recipe A", command="compress", resume=True, every=5)
    assert again.resumed and not (work.path / ".step.safetensors.tmp-0123abcd").exists()

    mine = tmp_path / "mine.work"  # the user's own directory of that name is never used nor removed
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(PrunqError, match="is not a prunq work directory"):
        WorkDir.open(tmp_path / "mine", "recipe A", command="compress", resume=True, every=5)
    WorkDir(mine, 5).remove()
    assert (mine / "notes.txt").read_text() == "keep"


def test_a_link_in_a_work_directory_is_not_followed(tmp_path):
    work = WorkDir.open(tmp_path / "run", "r", command="compress", resume=False, every=5)
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"x")
    (work.path / "boundary.safetensors").symlink_to(secret)
    with pytest.raises(PrunqError, match="is a symbolic link"):
        work.boundary()


def test_a_damaged_checkpoint_is_one_line(tmp_path):
    work = WorkDir.open(tmp_path / "run", "r", command="compress", resume=False, every=5)
    (work.path / "step.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(PrunqError, match=r"step\.safetensors: unreadable checkpoint .*remove the work directory"):
        work.step()


# ---------------------------------------------------------------------------------------------------
# compress() interrupted at a chosen loss call, then resumed from the work directory
# ---------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


class _Interrupting:
    """The digits task, stopping (like a kill) at its ``at``-th training loss."""

    def __init__(self, task, at: int | None) -> None:
        self._task, self.at, self.calls = task, at, 0

    def __getattr__(self, name):
        return getattr(self._task, name)

    def loss(self, model, batch):
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise _Stop
        return self._task.loss(model, batch)


def _recipe(**extra):
    data = {**TINY, "prune": {**TINY["prune"], "finetune": {"steps": 30}},
            "quant": {**TINY["quant"], "finetune": {"steps": 12}}, **extra}  # fmt: skip
    return parse_recipe(data)


def _dense(task):
    torch.manual_seed(0)
    return task.build_model("digits_cnn", width=0.5)


def _same(a, b):
    assert json.dumps(a.metrics) == json.dumps(b.metrics)
    assert json.dumps(a.manifest) == json.dumps(b.manifest)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("at", [1, 10, 33, 40, 46])  # 2 scoring, 30 pruning, 2 calibration, 12 QAT losses
def test_compress_stopped_anywhere_resumes_to_the_same_model_and_metrics(tmp_path, at):
    task, recipe = get_task("digits"), _recipe()
    ref = compress(_dense(task), task, recipe, quiet=True)
    work = WorkDir.open(tmp_path / "run", "r", command="compress", resume=False, every=4)
    with pytest.raises(_Stop):
        compress(_dense(task), _Interrupting(task, at), recipe, quiet=True, work=work)
    again = WorkDir.open(tmp_path / "run", "r", command="compress", resume=True, every=4)
    counted = _Interrupting(task, None)
    resumed = compress(_dense(task), counted, recipe, quiet=True, work=again)
    _same(ref, resumed)
    if at > 2 + 4:  # a checkpoint was on disk: it continued, with fewer losses than a run from the start
        assert counted.calls < 2 + 30 + 2 + 12


class _NoStateConfig(MethodConfig):
    kind: Literal["nostate-test"] = "nostate-test"
    finetune: TrainConfig = TrainConfig(steps=10)


@register_method(_NoStateConfig)
class _NoState(MethodBase):
    """A plug-in with hidden state and no state_dict: a resume must restart it, not continue it."""

    stage = "nostate"

    def attach(self, model, ctx):
        self.seen = 0

    def after_step(self, t):
        self.seen += 1
        return None

    def finalize(self, model, ctx):
        assert self.seen == self.config.finetune.steps  # a continued (not restarted) method would fail here
        return []


def test_a_method_without_state_dict_is_restarted_from_its_boundary(tmp_path):
    task = get_task("digits")
    data = {k: v for k, v in TINY.items() if k not in ("prune", "quant")}
    recipe = parse_recipe({**data, "methods": [{"kind": "nostate-test"}, {"kind": "prune", "sparsity": 0.5,
                                                                          "finetune": {"steps": 4}}]})  # fmt: skip
    ref = compress(_dense(task), task, recipe, quiet=True)
    work = WorkDir.open(tmp_path / "run", "r", command="compress", resume=False, every=3)
    with pytest.raises(_Stop):
        compress(_dense(task), _Interrupting(task, 8), recipe, quiet=True, work=work)
    assert work.step() is None  # no mid-method checkpoint for it
    resumed = compress(_dense(task), task, recipe, quiet=True, work=WorkDir(work.path, 3, resumed=True))
    _same(ref, resumed)


def test_the_work_directory_appears_and_goes_whole(tmp_path):
    """Created beside and renamed into place (never without its marker); removed by a rename first."""
    from prunq.report.fsutil import atomic_dir

    work = WorkDir.open(tmp_path / "run", "r", command="compress", resume=False, every=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.work"] and (work.path / "work.json").is_file()
    work.remove()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".run.work.old-0123abcd").mkdir()  # a kill during an earlier removal
    (tmp_path / ".run.work.tmp-89abcdef").mkdir()  # a kill during an earlier creation
    (tmp_path / ".run.work.keep").mkdir()  # not one of prunq's names: left alone
    atomic_dir(tmp_path / "run").close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.work.keep"]


def test_a_checkpoint_with_missing_or_mistyped_fields_is_one_line(tmp_path):
    from prunq.pipeline.checkpoint import _write

    work = WorkDir.open(tmp_path / "run", "r", command="compress", resume=False, every=5)
    _write(work.path / "step.safetensors", {"position": 0, "fit": {"step": "x"}}, {})
    with pytest.raises(PrunqError, match=r"step\.safetensors: damaged checkpoint \(ValueError"):
        work.step()
    _write(work.path / "boundary.safetensors", {"position": 1, "record": {"stages": 3, "history": []}},
           {"rng.cpu": torch.get_rng_state()})  # fmt: skip
    with pytest.raises(PrunqError, match=r"boundary\.safetensors: damaged checkpoint \(TypeError: stages is not a list"):
        work.boundary()
