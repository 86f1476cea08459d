#!/usr/bin/env bash
# The whole test suite, in a .venv created on first use from requirements.lock.
# The suite builds the docs site with warnings as errors and executes its tutorials (tests/test_docs.py), and
# builds the sdist and wheel, checks them with twine and runs the demo from the wheel (tests/test_release.py).
# `bash scripts/test.sh --deps latest|oldest [pytest args]` runs it on the newest / oldest releases
# pyproject.toml admits instead, in a throwaway venv (scripts/deps.sh).
if [ "${1:-}" = "--deps" ]; then
  shift
  exec bash "$(dirname "$0")/deps.sh" "$@"
fi
source "$(dirname "$0")/env.sh"
# Lint and types first (seconds): ruff's rules and formatting, mypy over all of src/narrowgate, and the layers
# (lint-imports: no module imports from a layer above its own; pyproject.toml's [tool.importlinter]).
if [ "$#" -eq 0 ] || [ "${NARROWGATE_LINT:-}" = "1" ]; then
  python -m ruff check src tests benchmarks scripts
  python -m ruff format --check src tests benchmarks scripts
  python -m mypy
  lint-imports --no-logo
fi
# One test process per CPU, at most 4 (pytest-xdist; each builds the tiny checkpoints it uses once):
# NARROWGATE_TEST_WORKERS=0 runs the suite in this process alone. What several tests share and only one may build
# (the docs site, the wheel) is built once per session behind a file lock (tests/conftest.py, `built_once`).
exec python -m pytest -q --durations=15 -n "${NARROWGATE_TEST_WORKERS:-auto}" --maxprocesses 4 "$@"
