"""The real CLI on good and bad input: outputs per METHOD.md §5, exit code 2 and nothing partial."""

import json
import subprocess
import sys

import pytest
import yaml

from prunq.cli import main

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
    same = ["model.safetensors", "model.json", "metrics.json", "recipe.yaml", "dense.safetensors"]
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


def test_sweep_writes_one_table_and_pareto_plots(tmp_path):
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


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    """Issue 10: SIGTERM printed nothing and left a hidden temp dir beside --out."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "prunq", "compress", _slow_recipe(tmp_path), "--out", out, "--quiet"],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(6)  # well into dense training
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip() == "prunq: terminated (SIGTERM); nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.yaml"]  # no run, no temp dir, no lock


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
