"""Session fixtures: tiny checkpoints of every family, built once per test session.

Every module in tests/fixtures/ other than `common` is a family builder with ``build(path)``;
`FAMILIES` lists them, so engine tests run on each family as soon as its builder exists.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
from collections.abc import Callable
from pathlib import Path

from narrowgate import threads

# A worker process starts with COLUMNS=80 in its environment, which rich would fix as every console's width: the
# tests give the width they need per command (CliRunner's env), as in a single process.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)
# Before torch loads: idle OpenMP threads sleep, and the CPUs this process may use are shared among the suite's
# worker processes (pytest-xdist, `-n`): each takes its part (the suite shares its machine fairly; organism
# training still fixes its own 2 threads).
# A worker inherits the controller's environment, where `threads.configure` below has already given one process
# every CPU (marked by _NARROWGATE_SUITE_THREADS); a thread count the user set before pytest is left alone.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and (
    "OMP_NUM_THREADS" not in os.environ or os.environ.get("_NARROWGATE_SUITE_THREADS") == "1"
):
    os.environ["OMP_NUM_THREADS"] = str(max(1, threads.usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["_NARROWGATE_SUITE_THREADS"] = "1"
threads.configure()

import pytest  # noqa: E402

import tests.fixtures as fixtures_pkg  # noqa: E402

FAMILIES = sorted(m.name for m in pkgutil.iter_modules([str(Path(fixtures_pkg.__file__).parent)]) if m.name != "common")
#: The families the per-family matrices (engine, interventions, every family) run on in the fast tier,
#: `-m "not slow"`: image tokens in the vocabulary closed by [EOI] (chameleon), a projected vision tower (llava),
#: M-RoPE over a dynamic grid (qwen2_vl). The others are marked `slow`: the default run and CI run every family,
#: and NARROWGATE_ALL_FAMILIES=1 keeps them all in the fast tier too.
FAST_FAMILIES = ("chameleon", "llava", "qwen2_vl")


def family_params() -> list:
    """`FAMILIES` as pytest parameters, the ones outside `FAST_FAMILIES` marked `slow`."""
    every = os.environ.get("NARROWGATE_ALL_FAMILIES") == "1"
    return [pytest.param(f, marks=() if every or f in FAST_FAMILIES else pytest.mark.slow) for f in FAMILIES]


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """``checkpoint_dir(family)`` -> path of that family's tiny checkpoint (built on first use)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            module = importlib.import_module(f"tests.fixtures.{family}")
            path = tmp_path_factory.mktemp(f"ckpt-{family}")
            module.build(path)
            built[family] = path
        return built[family]

    return get


@pytest.fixture(scope="session")
def loaded(checkpoint_dir):
    """``loaded(family, dtype="float32", attn="sdpa")`` -> a `narrowgate.VLM`, cached per arguments."""
    import narrowgate as ng

    cache = {}

    def get(family: str, dtype: str = "float32", attn: str = "sdpa"):
        key = (family, dtype, attn)
        if key not in cache:
            cache[key] = ng.load(checkpoint_dir(family), dtype=dtype, attn_implementation=attn)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def built_once(tmp_path_factory) -> Callable[[str, Callable[[Path], None]], Path]:
    """``built_once(name, build)`` -> a folder that ``build(folder)`` filled once for the whole test session.

    Whichever test process asks first builds it; the others wait on a file lock and reuse it, and a build that
    failed fails every later asker with its message instead of running again. Nothing depends on how the tests
    were spread over processes (pytest-xdist's `--dist loadgroup` stopped grouping under pytest 9.2, and two
    docs builds side by side in one checkout broke each other).
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the session's folder, above every worker's own

    def get(name: str, build: Callable[[Path], None]) -> Path:
        out = root / f"once-{name}"
        done, failed = out.with_name(out.name + ".done"), out.with_name(out.name + ".failed")
        with FileLock(str(out) + ".lock"):
            if failed.exists():
                pytest.fail(f"{name}, built by another test process, failed:\n{failed.read_text()}")
            if not done.exists():
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                try:
                    build(out)
                except BaseException as e:
                    failed.write_text(str(e))
                    raise
                done.touch()
        return out

    return get


def pytest_collection_modifyitems(config, items):
    """`retrain` tests (a full organism retraining, ~10 minutes on 2 cores) run when asked for: `-m retrain`,
    or NARROWGATE_RETRAIN=1 for the whole suite. The default suite, and CI, leave them out; `slow` tests run
    by default (CI runs them) and `-m "not slow"` skips them."""
    if os.environ.get("NARROWGATE_RETRAIN") == "1" or "retrain" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="retrain: run with -m retrain or NARROWGATE_RETRAIN=1")
    for item in items:
        if "retrain" in item.keywords:
            item.add_marker(skip)
