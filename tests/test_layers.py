"""The layer order of docs/architecture.md, enforced with import-linter (contracts in pyproject.toml).

``errors, io, config, logs`` <- ``space`` <- ``nn`` <- ``detection`` <- ``data`` <- {``search``, ``train``} <-
``analysis`` <- ``commands``/``cli``/``demo``, and no import cycle between sibling modules or packages. The
first test checks the package as it is; the others add one forbidden import to a copy of the package and show
that the check then fails and names it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "pyproject.toml"

pytest.importorskip("importlinter", reason="import-linter is in the test extra (pip install -e .[test])")


def lint(src: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """Run ``lint-imports`` on the ``nasfcos`` package found in ``src`` (no cache is written anywhere)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
               str(CONFIG), "--no-cache"]
    for contract in contracts:
        command += ["--contract", contract]
    return subprocess.run(command, cwd=src, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers_and_has_no_cycles() -> None:
    result = lint(REPO / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.fixture()
def package_copy(tmp_path: Path) -> Path:
    """A copy of ``src/nasfcos`` (sources only) under ``tmp_path/src``."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "nasfcos", src / "nasfcos",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


@pytest.mark.parametrize(
    ("module", "text", "contract", "reported"),
    [
        # space (plain data) reaching up to training: an upward import.
        ("space/_upward.py", "from nasfcos.train.trainer import train\n", "layers",
         "nasfcos.space._upward -> nasfcos.train.trainer"),
        # a function-level import counts as much as a top-level one.
        ("nn/_upward.py", "def f():\n    from nasfcos.data.cache import FeatureCache\n", "layers",
         "nasfcos.nn._upward -> nasfcos.data.cache"),
        # search and train are siblings: neither may import the other.
        ("search/_peek.py", "import nasfcos.train.engine\n", "layers", "nasfcos.search._peek -> nasfcos.train.engine"),
    ],
)
def test_an_added_forbidden_import_breaks_the_layers(package_copy: Path, module: str, text: str, contract: str,
                                                     reported: str) -> None:
    assert lint(package_copy, contract).returncode == 0  # the copy itself is clean
    (package_copy / "nasfcos" / module).write_text(text, encoding="utf-8")
    result = lint(package_copy, contract)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and reported in result.stdout, result.stdout


def test_an_added_cycle_between_siblings_breaks_the_acyclic_contract(package_copy: Path) -> None:
    """The genotype <-> released cycle the layering removed, put back on purpose."""
    released = package_copy / "nasfcos" / "space" / "released.py"
    released.write_text(released.read_text(encoding="utf-8")
                        + "\n\ndef _back():\n    from nasfcos.space.genotype import Genotype\n\n    return Genotype\n",
                        encoding="utf-8")
    result = lint(package_copy, "acyclic")
    assert result.returncode != 0
    assert "No cycles are allowed in nasfcos.space" in result.stdout, result.stdout
    assert "released" in result.stdout.split("No cycles are allowed in nasfcos.space", 1)[1]
