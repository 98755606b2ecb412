"""The real CLI on good and bad input: outputs per METHOD.md §5, exit code 2 and nothing partial."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from prunq.cli import main
from prunq.core.errors import PrunqError

from tests._tiny import TINY


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "prunq", *map(str, args)], capture_output=True, text=True)


def _recipe(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    recipe = _recipe(tmp, TINY)
    out = tmp / "run"
    proc = _cli("compress", recipe, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return recipe, out


def test_compress_writes_the_run_directory(good_run):
    _, out = good_run
    for f in ("recipe.yaml", "metrics.json", "report.md", "model.safetensors", "model.json",
              "plots/layers.png", "plots/stages.png"):  # fmt: skip
        assert (out / f).is_file(), f
    assert (out / "plots/layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    prune = resolved["methods"][0]
    assert prune["kind"] == "prune" and prune["sparsity"] == 0.9 and prune["criterion"] == "taylor"
    assert [m["kind"] for m in resolved["methods"]] == ["prune", "quantize"]
    m = json.loads((out / "metrics.json").read_text())
    assert "features.conv2" in (out / "report.md").read_text()
    assert not list(out.parent.glob(".*tmp*")), "temporary directories left behind"
    assert m["compressed"]["sparsity"] >= 0.899
    files = m["files"]  # real files beside the cost model's figure
    assert files["packed_bytes"] == (out / "model.packed").stat().st_size
    assert files["dense_fp32_bytes"] == (out / "dense.safetensors").stat().st_size
    assert files["cost_model_bytes"] == m["compressed"]["memory_bits"] / 8 < files["packed_bytes"]
    import prunq  # the packed file is the compressed model: same test metric

    packed = prunq.load(out / "model.packed")
    assert prunq.get_task("digits").evaluate(packed)["metric"] == m["compressed"]["metric"]


def test_evaluate_and_report_from_a_saved_run(good_run):
    _, out = good_run
    proc = _cli("evaluate", out)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["metric"] == res["recorded"]
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file()


def test_the_trained_dense_model_is_kept_and_reusable(good_run, tmp_path):
    """dense.safetensors holds the model the run trained: as `model.checkpoint` it gives the same dense metric."""
    _, out = good_run
    assert (out / "dense.safetensors").is_file()
    m = json.loads((out / "metrics.json").read_text())
    reuse = {**TINY, "model": {**TINY.get("model", {}), "checkpoint": str(out / "dense.safetensors")}}
    reuse["prune"] = {**TINY["prune"], "finetune": {"steps": 0}}
    assert main(["compress", str(_recipe(tmp_path, reuse)), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["dense"]["metric"] == m["dense"]["metric"]
    assert not (tmp_path / "again" / "dense.safetensors").exists()  # loaded, not trained: nothing new to keep


def test_the_same_recipe_and_seed_give_byte_identical_files(good_run, tmp_path):
    """Issue 10: model.safetensors bytes differed between runs (safetensors' metadata order); timings made
    metrics.json differ. Both are reproducible now; wall times live in timing.json."""
    import hashlib

    recipe, first = good_run
    again = tmp_path / "again"
    proc = _cli("compress", recipe, "--out", again, "--quiet")
    assert proc.returncode == 0, proc.stderr
    same = ["model.safetensors", "model.json", "metrics.json", "recipe.yaml", "dense.safetensors", "model.packed"]
    for name in same:
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (first, again)]
        assert digest[0] == digest[1], name
    assert "total_s" in json.loads((again / "timing.json").read_text())
    assert "timing" not in json.loads((again / "metrics.json").read_text())
    modes = {p.name: p.stat().st_mode & 0o777 for p in again.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # safetensors files were 0600, the rest 0644


def test_existing_out_needs_overwrite(good_run, capsys):
    recipe, out = good_run
    before = (out / "metrics.json").read_text()
    assert main(["compress", str(recipe), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--out" in err and "--overwrite" in err
    assert (out / "metrics.json").read_text() == before


@pytest.mark.parametrize(
    "change, field",
    [
        ({"prune": {"sparsity": 1.0}}, "prune.sparsity"),
        ({"prune": {"sparsity": 0.9, "criterion": "l1"}}, "prune.criterion"),
        ({"prune": {"granularity": "diagonal"}}, "prune.granularity"),
        ({"prune": {"granularity": "4:2"}}, "prune.granularity"),
        ({"quant": {"weight_bits": 9}}, "quant.weight_bits"),
        ({"quant": {"act_bits": 1}}, "quant.act_bits"),
        ({"quantise": {}}, "quantise: unknown key"),
        ({"prune": {"exclude": ["*"]}}, "no prunable layer"),
        ({"model": {"name": "vgg"}}, "model.name"),
        ({"task": {"name": "imagenet"}}, "task.name"),
        ({"model": {"checkpoint": "missing.safetensors"}}, "missing.safetensors"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, change, field):
    data = json.loads(json.dumps(TINY))
    for k, v in change.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) and k in data else v
    if "checkpoint" in change.get("model", {}):
        data["model"]["checkpoint"] = str(tmp_path / "missing.safetensors")
    out = tmp_path / "out"
    assert main(["compress", str(_recipe(tmp_path, data)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunq: error:") and "\n" not in err and field in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"]


def test_bad_input_through_the_real_process(tmp_path):
    out = tmp_path / "out"
    proc = _cli("compress", _recipe(tmp_path, {"prune": {"sparsity": 1.5}}), "--out", out)
    assert proc.returncode == 2
    assert "prune.sparsity" in proc.stderr and not out.exists()
    proc = _cli("compress", tmp_path / "nope.yaml", "--out", out)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr


def test_missing_or_corrupt_run_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{not json")
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "metrics.json" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "run")]) == 2


def test_corrupt_checkpoint_in_run(good_run, tmp_path, capsys):
    import shutil

    _, out = good_run
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    assert main(["evaluate", str(bad)]) == 2
    assert "model.safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_writes_one_table_and_pareto_plots_and_resumes_after_a_kill(tmp_path):
    data = json.loads(json.dumps(TINY))
    data["dense"]["steps"] = 60
    data["prune"]["finetune"]["steps"] = 10
    data["quant"]["finetune"]["steps"] = 3
    out = tmp_path / "sweep"
    code = main(["sweep", str(_recipe(tmp_path, data)), "--sparsity", "0.5", "0.9", "--weight-bits", "4", "2",
                 "--act-bits", "8", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    for f in ("sweep.md", "sweep.csv", "sweep.json", "pareto_bops.png", "pareto_memory.png"):
        assert (out / f).is_file(), f
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert {(r["sparsity"], r["weight_bits"]) for r in rows} == {(0.5, 4), (0.5, 2), (0.9, 4), (0.9, 2)}
    assert all((out / r["run"] / "metrics.json").is_file() for r in rows)
    by = {(r["sparsity"], r["weight_bits"]): r["bops"] for r in rows}
    assert by[(0.9, 2)] < by[(0.9, 4)] < by[(0.5, 4)]

    # Killed (SIGKILL) after its first finished point, then resumed: that point is not run again, and the
    # table and every point's files equal the uninterrupted sweep's (timings aside).
    import signal
    import time

    again, work = tmp_path / "again", tmp_path / "again.work"
    cmd = [sys.executable, "-m", "prunq", "sweep", str(tmp_path / "r.yaml"), "--sparsity", "0.5", "0.9",
           "--weight-bits", "4", "2", "--act-bits", "8", "--out", str(again), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not list((work / "rows").glob("*.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = sorted(p.name for p in (work / "rows").glob("*.json"))
    assert 1 <= len(done) < 4 and not again.exists()
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.startswith("prunq: resuming from ") and not work.exists()
    untimed = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]
    rows2 = json.loads((again / "sweep.json").read_text())["rows"]
    assert [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows2] == untimed
    for r in rows:
        for f in ("metrics.json", "model.safetensors"):
            assert (out / r["run"] / f).read_bytes() == (again / r["run"] / f).read_bytes(), (r["run"], f)


def test_sweep_rejects_bad_bits(tmp_path, capsys):
    assert main(["sweep", str(_recipe(tmp_path, TINY)), "--sparsity", "0.5", "--weight-bits", "9",
                 "--out", str(tmp_path / "s")]) == 2  # fmt: skip
    assert "--weight-bits" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_overwrite_refuses_a_directory_prunq_did_not_write(tmp_path):
    """Issue 10: `compress proj/r.yaml --out proj --overwrite` deleted the recipe itself (and the user's files)."""
    proj = tmp_path / "proj"
    proj.mkdir()
    recipe = _recipe(proj, TINY)
    (proj / "thesis.tex").write_text("years of work")
    proc = _cli("compress", recipe, "--out", proj, "--overwrite", "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "is not a prunq run directory" in proc.stderr
    assert sorted(p.name for p in proj.iterdir()) == ["r.yaml", "thesis.tex"]


@pytest.mark.parametrize("link", ["recipe.yaml", "metrics.json", "plots", "model.json"])
def test_no_command_follows_a_link_out_of_a_run_directory(good_run, tmp_path, link):
    """Issue 10: `prunq report` copied a symlinked recipe.yaml's target (an SSH key parses as YAML) into
    report.md, and a symlinked plots/ made it write PNGs anywhere."""
    import shutil

    _, out = good_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.yaml").write_text("key: PRIVATE\n")
    target = outside if link == "plots" else outside / "secret.yaml"
    victim = run / link
    if victim.is_dir():
        shutil.rmtree(victim)
    else:
        victim.unlink()
    victim.symlink_to(target)
    command = "evaluate" if link == "model.json" else "report"
    proc = _cli(command, run)
    assert proc.returncode == 2, proc.stderr
    assert "is a symbolic link" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert sorted(p.name for p in outside.iterdir()) == ["secret.yaml"]  # nothing written out there
    report = run / "report.md"
    assert not report.exists() or "PRIVATE" not in report.read_text()


def _slow_recipe(tmp_path):
    data = {**TINY, "dense": {**TINY["dense"], "steps": 4000}}
    return _recipe(tmp_path, data, "slow.yaml")


def test_sigterm_is_handled_like_ctrl_c_and_keeps_the_checkpoint(tmp_path):
    """Issue 10: SIGTERM printed nothing, left a hidden temp dir beside --out and lost the dense training."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "prunq", "compress", _slow_recipe(tmp_path), "--out", out, "--quiet",
                             "--checkpoint-every", "20"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / "run.work" / "step.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # until the first dense-training checkpoint
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert re.fullmatch(r"prunq: terminated \(SIGTERM\); checkpoint kept in \S+run\.work \(dense training, step \d+\); "
                        r"the same command with --resume continues", err.strip()), err  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.work", "slow.yaml"]  # no run, no temp dir, no lock
    again = _cli("compress", _slow_recipe(tmp_path), "--out", out, "--quiet")
    assert again.returncode == 2 and "pass --resume to continue it" in again.stderr


def test_a_second_run_into_the_same_out_stops_at_once(tmp_path):
    """Issue 10: two runs into one --out both exited 0 and the last silently won."""
    from prunq.report.fsutil import atomic_dir

    out = tmp_path / "run"
    held = atomic_dir(out)  # another run is writing `out`
    try:
        proc = _cli("compress", _recipe(tmp_path, TINY), "--out", out, "--quiet")
        assert proc.returncode == 2 and "is being written by another prunq run" in proc.stderr
    finally:
        held._release()
    assert not out.exists() and not (tmp_path / ".run.lock").exists()


def _step_position(work):
    """The position of the fine-tuning checkpoint in ``work`` (-1 dense, 0 prune, 1 quantize), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(work / "step.safetensors"), "pt") as f:
            return json.loads(f.metadata()["prunq_checkpoint"])["position"]
    except Exception:  # not there yet, or replaced while we read it
        return None


@pytest.mark.slow
def test_sigkill_during_dense_pruning_qat_and_writing_then_resume_gives_identical_files(tmp_path):
    """Issue 10: a killed run lost everything. Killed with SIGKILL in each stage and while writing, then
    resumed each time, the run ends with the same bytes as an uninterrupted one (one thread: bitwise)."""
    import hashlib
    import os
    import signal
    import time

    data = {**TINY, "dense": {**TINY["dense"], "steps": 300},
            "prune": {**TINY["prune"], "finetune": {"steps": 120}},
            "quant": {**TINY["quant"], "finetune": {"steps": 80, "lr": 2e-4}}}  # fmt: skip
    recipe = _recipe(tmp_path, data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def start(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "prunq", "compress", recipe, "--out", out, "--quiet",
                                 "--checkpoint-every", "7", *extra], env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip

    ref = start(tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    out, work = tmp_path / "run", tmp_path / "run.work"
    moments = {  # when to kill: a checkpoint of that stage is on disk, or the run's temp dir appeared
        "dense": lambda: _step_position(work) == -1,
        "prune": lambda: _step_position(work) == 0,
        "qat": lambda: _step_position(work) == 1,
        "writing": lambda: any(p.name.startswith(".run.tmp-") for p in tmp_path.iterdir()),
    }
    killed, resumed_from = [], []
    for i, (name, ready) in enumerate(moments.items()):
        proc = start(out, *(["--resume"] if i else []))
        while proc.poll() is None and not ready():
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed.append(name)
        resumed_from.append(proc.communicate(timeout=60)[1].strip())
    assert killed == list(moments), killed  # every moment was reached (and killed) in turn
    assert not out.exists() and work.is_dir()

    last = start(out, "--resume")
    assert last.wait(timeout=300) == 0, last.stderr.read()
    resumed_from.append(last.stderr.read().strip())
    # each run continued where the one before was killed, not from the start
    expected = [r"^$", r"\(dense training, step \d+\)", r"\(method 1, step \d+\)", r"\(method 2, step \d+\)",
                r"\(2 method\(s\) done\)"]  # fmt: skip
    for got, want in zip(resumed_from, expected):
        assert re.search(want, got.splitlines()[0] if got else ""), (got, want)
    for f in ("model.safetensors", "model.json", "metrics.json", "dense.safetensors", "recipe.yaml"):
        digest = [hashlib.sha256((d / f).read_bytes()).hexdigest() for d in (tmp_path / "ref", out)]
        assert digest[0] == digest[1], f
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["r.yaml", "ref", "run"], left  # no work dir, temp dir or lock after a finished run


def test_a_diverging_run_stops_with_one_line_and_keeps_its_last_checkpoint(tmp_path):
    """Issue 10: Adam at lr 1e6 wrote a normal-looking run (accuracy at chance) with exit 0."""
    data = {**TINY, "dense": {**TINY["dense"], "lr": 1e6}}
    proc = _cli("compress", _recipe(tmp_path, data), "--out", tmp_path / "run", "--quiet", "--checkpoint-every", "1")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and re.match(r"prunq: error: dense: diverged at step \d+: ", line), line
    assert "last good checkpoint kept for inspection in" in line and "run.work" in line
    assert not (tmp_path / "run").exists() and (tmp_path / "run.work").is_dir()


def test_export_writes_a_packed_file_and_refuses_what_it_cannot_do(good_run, tmp_path):
    import prunq

    _, out = good_run
    target = tmp_path / "m.packed"
    proc = _cli("export", out, "--out", target)
    assert proc.returncode == 0 and proc.stdout.startswith(f"wrote {target} (")
    assert target.read_bytes() == (out / "model.packed").read_bytes()
    again = _cli("export", out, "--out", target)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    bad = _cli("export", out, "--out", tmp_path / "x", "--format", "tflite")
    assert bad.returncode == 2 and "unknown format 'tflite'" in bad.stderr and not (tmp_path / "x").exists()
    assert prunq.load(target).state_dict().keys() == prunq.load(out, convert=True).state_dict().keys()


def test_a_machine_error_is_one_line_not_a_traceback(tmp_path):
    """Review: an OSError (a full disk, a path that cannot exist) printed a traceback."""
    proc = _cli("compress", _recipe(tmp_path, TINY), "--out", "/proc/prunq-nope/run", "--quiet")
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("prunq: error: /proc/prunq-nope") and "Traceback" not in proc.stderr


def test_resume_refuses_a_changed_dense_checkpoint(good_run, tmp_path):
    """The work directory's identity covers the bytes of model.checkpoint, not only its path."""
    import shutil

    _, out = good_run
    ckpt = tmp_path / "dense.safetensors"
    shutil.copy(out / "dense.safetensors", ckpt)
    data = {**TINY, "model": {**TINY["model"], "checkpoint": str(ckpt)}}
    recipe = _recipe(tmp_path, data)
    from types import SimpleNamespace

    from prunq.cli import _work
    from prunq.pipeline.recipes import load_recipe

    args = SimpleNamespace(out=tmp_path / "run", resume=False, checkpoint_every=5)
    _work(args, load_recipe(recipe), "compress")
    ckpt.write_bytes(ckpt.read_bytes()[:-1] + b" ")  # the file changed since the run started
    args = SimpleNamespace(out=tmp_path / "run", resume=True, checkpoint_every=5)
    with pytest.raises(PrunqError, match=r"of a different recipe \(or dense checkpoint, or prunq version\)"):
        _work(args, load_recipe(recipe), "compress")
