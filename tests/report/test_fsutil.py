"""Atomic writes (prunq.report.fsutil): a reader sees the old content or the new, never half of either."""

from __future__ import annotations

import doctest

import pytest

import prunq.report.fsutil as fsutil
from prunq.core.errors import PrunqError
from prunq.report.fsutil import atomic_dir, atomic_write_bytes, atomic_write_text


def test_atomic_dir_success_and_overwrite(tmp_path):
    final = tmp_path / "out" / "run"
    with atomic_dir(final, overwrite=False) as tmp:
        assert tmp.parent == final.parent and tmp != final
        assert not final.exists()
        (tmp / "a.txt").write_text("new")
        (tmp / "model.json").write_text('{"format": 2, "transforms": []}')  # a prunq run
    assert (final / "a.txt").read_text() == "new"

    with pytest.raises(PrunqError, match=r"--out: .*run exists; pass --overwrite to replace it"):
        atomic_dir(final, overwrite=False)  # refused before any work, at construction
    with pytest.raises(PrunqError):
        with atomic_dir(final):
            pytest.fail("body must not run")

    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("newer")
        assert (final / "a.txt").exists()  # the old run stays until the new one is complete
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["run"]


def test_atomic_dir_exception_leaves_nothing(tmp_path):
    final = tmp_path / "run"
    with pytest.raises(RuntimeError, match="diverged"):
        with atomic_dir(final, overwrite=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("diverged")
    assert list(tmp_path.iterdir()) == []

    final.mkdir()
    (final / "old.txt").write_text("old")
    (final / "model.json").write_text('{"format": 2, "transforms": []}')
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("x")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert sorted(p.name for p in final.iterdir()) == ["model.json", "old.txt"]


def test_atomic_write(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "r.md", "héllo\n")
    assert p.read_bytes() == "héllo\n".encode()
    atomic_write_bytes(p, b"\x00")
    assert p.read_bytes() == b"\x00"
    with pytest.raises(TypeError):
        atomic_write_bytes(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_bytes() == b"\x00"
    assert [q.name for q in p.parent.iterdir()] == ["r.md"]


def test_a_directory_that_appears_meanwhile_is_not_replaced(tmp_path):
    final = tmp_path / "run"
    with pytest.raises(PrunqError, match="pass --overwrite"):
        with atomic_dir(final, overwrite=False) as tmp:
            (tmp / "new.txt").write_text("mine")
            final.mkdir()  # someone else's run, created while this one was being written
            (final / "theirs.txt").write_text("theirs")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # checked again at commit; the temp dir is gone
    assert [p.name for p in final.iterdir()] == ["theirs.txt"]


def test_a_symlink_counts_as_existing(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "run").symlink_to(tmp_path / "target")
    with pytest.raises(PrunqError, match="exists"):
        atomic_dir(tmp_path / "run", overwrite=False)
    (tmp_path / "target" / "model.json").write_text('{"format": 2}')
    with pytest.raises(PrunqError, match="not a prunq run directory"):  # a link is never a run to replace
        atomic_dir(tmp_path / "run", overwrite=True)
    assert (tmp_path / "run").is_symlink() and (tmp_path / "target" / "model.json").is_file()


@pytest.mark.parametrize("make", ["user_files", "recipe_inside", "linked_manifest", "bad_manifest"])
def test_overwrite_never_deletes_what_prunq_did_not_write(tmp_path, make):
    """Issue 10: --overwrite deleted a user's thesis.tex and data/, and the recipe it was reading."""
    final = tmp_path / "proj"
    final.mkdir()
    if make == "user_files":
        (final / "thesis.tex").write_text("years of work")
        (final / "data").mkdir()
    elif make == "recipe_inside":
        (final / "r.yaml").write_text("prune: {sparsity: 0.9}")
    elif make == "linked_manifest":
        (tmp_path / "elsewhere.json").write_text('{"format": 2}')
        (final / "model.json").symlink_to(tmp_path / "elsewhere.json")
    else:
        (final / "model.json").write_text("[1, 2]")
    before = sorted(p.name for p in final.iterdir())
    with pytest.raises(PrunqError, match="is not a prunq run directory"):
        with atomic_dir(final, overwrite=True):
            pytest.fail("body must not run")
    assert sorted(p.name for p in final.iterdir()) == before


def test_overwrite_replaces_a_sweep_directory(tmp_path):
    final = tmp_path / "sweep"
    final.mkdir()
    (final / "sweep.json").write_text('{"rows": []}')
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "sweep.json").write_text('{"rows": [1]}')
    assert (final / "sweep.json").read_text() == '{"rows": [1]}'


def test_docstring_examples():
    result = doctest.testmod(fsutil, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
