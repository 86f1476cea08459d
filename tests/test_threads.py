"""A fair share of the CPU: the wait policy and thread count every entry point sets before torch loads."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from narrowgate import threads

ROOT = Path(__file__).resolve().parents[1]
#: Every file that starts a process running narrowgate's computations, and so must choose before torch loads
#: (benchmarks that only start other processes, such as shared_load.py, load no torch themselves).
ENTRY_POINTS = [
    "src/narrowgate/cli.py",
    "tests/conftest.py",
    "scripts/coverage.py",
    *sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "benchmarks").glob("*.py")
        if "import torch" in p.read_text() or "import narrowgate as ng" in p.read_text()
    ),
]


def test_unset_variables_get_the_fair_share():
    env: dict[str, str] = {}
    assert (
        threads.configure(env)
        == env
        == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000", "OMP_NUM_THREADS": str(threads.usable_cpus())}
    )


@pytest.mark.parametrize("variable", threads.WAIT_VARIABLES)
def test_a_wait_choice_of_the_user_is_kept(variable):
    env = {variable: "300000" if variable != "OMP_WAIT_POLICY" else "ACTIVE", "OMP_NUM_THREADS": "3"}
    assert threads.configure(env) == {}
    assert env == {variable: env[variable], "OMP_NUM_THREADS": "3"}


def test_torchrun_ranks_split_the_cpus():
    env = {"LOCAL_WORLD_SIZE": "2"}
    assert threads.settings(env)["OMP_NUM_THREADS"] == str(max(1, threads.usable_cpus() // 2))


def test_usable_cpus_follow_the_affinity_mask():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this OS")
    assert threads.usable_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_the_command_line_sets_the_policy_and_an_affinity_sized_pool_before_torch():
    """A process pinned to one CPU that imports the command line gets the short spin and one torch thread."""
    code = (
        "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); import narrowgate.cli; "
        "assert 'torch' not in sys.modules; import torch; "
        "print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'], torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in (*threads.WAIT_VARIABLES, "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "10000", "1"]


def test_configure_after_torch_warns_and_sets_the_thread_count(monkeypatch):
    import torch

    before = torch.get_num_threads()
    for name in (*threads.WAIT_VARIABLES, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    try:
        with pytest.warns(RuntimeWarning, match="before importing torch"):
            threads.configure()
        assert torch.get_num_threads() == threads.usable_cpus()
    finally:
        torch.set_num_threads(before)


#: What may be imported before `threads.configure`: nothing that loads torch.
LIGHT = {"narrowgate.threads", "narrowgate.errors", "narrowgate.parsing", "narrowgate.roles", "narrowgate.catalog"}
LIGHT |= {"narrowgate.deprecation"}
LIGHT |= {"typer", "rich"}


def _imports_before(tree: ast.Module, line: int) -> list[str]:
    """Module-level imports above ``line``, as absolute module names (``from . import x`` in narrowgate: narrowgate.x)."""
    out = []
    for node in tree.body:
        if node.lineno >= line:
            break
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "narrowgate" + (f".{node.module}" if node.module else "") if node.level else node.module or ""
            out += [f"{base}.{a.name}" if base == "narrowgate" else base for a in node.names]
    return out


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_every_entry_point_configures_before_torch_loads(path):
    """The call to `threads.configure` comes before any module-level import that could load torch."""
    tree = ast.parse((ROOT / path).read_text())
    configure = next(
        node.lineno
        for node in tree.body
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and ast.unparse(node.value.func) == "threads.configure"
    )
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    early = [m for m in _imports_before(tree, configure) if m.split(".")[0] not in stdlib]
    assert all(m in LIGHT or m.split(".")[0] in LIGHT for m in early), (
        f"{path} imports {early} before threads.configure() (line {configure})"
    )
