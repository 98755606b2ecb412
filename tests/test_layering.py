"""The data flows one way: lower layers never import upper ones (checked on the source, every import)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prunq"
UPPER = ("prunq.methods", "prunq.pipeline", "prunq.tasks", "prunq.cli", "prunq.report")
#: package -> the prunq packages it may import
ALLOWED = {
    "core": ("prunq.core",),
    "prune": ("prunq.core", "prunq.prune"),
    "quant": ("prunq.core", "prunq.prune", "prunq.quant"),
    "cost": ("prunq.core", "prunq.prune", "prunq.quant", "prunq.cost"),
    "export": ("prunq.core", "prunq.prune", "prunq.quant", "prunq.cost", "prunq.export"),
    "runtime": ("prunq.core", "prunq.prune", "prunq.quant", "prunq.cost", "prunq.runtime"),
    "methods": ("prunq.core", "prunq.prune", "prunq.quant", "prunq.cost", "prunq.methods", "prunq"),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return [n for n in names if n == "prunq" or n.startswith("prunq.")]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_lower_layers_do_not_import_upper_ones(package):
    bad = []
    for f in sorted((SRC / package).rglob("*.py")):
        for name in _imports(f):
            ok = any(name == a or name.startswith(a + ".") for a in ALLOWED[package])
            own = name == f"prunq.{package}" or name.startswith(f"prunq.{package}.")
            if not ok or (name.startswith(UPPER) and not own):
                bad.append(f"{f.relative_to(SRC)}: {name}")
    assert not bad, bad


def test_tests_mirror_the_package():
    """Every module of src/prunq has a test module at the same path (test_<name>.py), or is covered by
    its package's tests as listed here."""
    covered_elsewhere = {
        "__init__.py", "__main__.py", "errors.py", "qparams.py", "parametrize.py",  # tested through users
    }  # fmt: skip
    missing = []
    for f in sorted(SRC.rglob("*.py")):
        if f.name in covered_elsewhere or f.name.startswith("_"):  # private modules: tested via their public face
            continue
        rel = f.relative_to(SRC)
        test = SRC.parents[1] / "tests" / rel.parent / f"test_{f.name}"
        if not test.exists():
            missing.append(str(rel))
    assert not missing, missing
