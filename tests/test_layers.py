"""The layers contract (pyproject.toml, ``[tool.importlinter]``): no module imports from a layer above its own.

`lint-imports` checks it in scripts/test.sh; these tests run the same check, and show it is not vacuous: a copy
of the package with one back edge added (the two the contract was written to end, and errors -> cli) fails it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under ``root/src`` with ``root/pyproject.toml``'s contracts, no cache."""
    code = (
        f"import sys; sys.path.insert(0, {str(root / 'src')!r}); from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(root / 'pyproject.toml')!r}, no_cache=True, no_logo=True))"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)


def test_the_package_keeps_its_layers():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "edge"),
    [
        ("plots.py", "from .analyses import EXPERIMENTS", "narrowgate.plots -> narrowgate.analyses"),
        ("loading.py", "from .organisms import path", "narrowgate.loading -> narrowgate.organisms"),
        ("errors.py", "from . import cli", "narrowgate.errors -> narrowgate.cli"),
        ("data/tasks.py", "from ..analyses import options", "narrowgate.data.tasks -> narrowgate.analyses.options"),
    ],
)
def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path, module, line, edge):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(
        ROOT / "src" / "narrowgate",
        tmp_path / "src" / "narrowgate",
        ignore=shutil.ignore_patterns("checkpoints", "__pycache__"),
    )
    target = tmp_path / "src" / "narrowgate" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    result = _lint(tmp_path)
    assert result.returncode != 0 and "0 kept, 1 broken" in result.stdout
    assert edge in result.stdout, result.stdout
