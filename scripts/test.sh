#!/usr/bin/env bash
# The whole test suite, in a .venv created on first use.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q --durations=15 "$@"
