#!/usr/bin/env bash
# Run the test suite against other dependency sets than the lock, in a throwaway venv:
#   latest  the newest releases pyproject.toml's ranges admit (pip's own resolve, as a new user gets)
#   oldest  the lowest releases of narrowgate's direct dependencies the ranges admit (uv's
#           lowest-direct resolution), torch and torchvision included
# Usage: bash scripts/test.sh --deps latest|oldest [pytest args]. The venv is .venv-deps-MODE in the
# checkout, made anew each time; the versions it held are printed before the tests and written to
# .venv-deps-MODE/versions.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE="${1:?usage: bash scripts/test.sh --deps latest|oldest [pytest args]}"
shift
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv-deps-$MODE"
source "$ROOT/scripts/pip.sh"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
ng_pip "$VENV" install -q --upgrade pip setuptools
case "$MODE" in
  latest)
    # shellcheck disable=SC2086
    ng_pip "$VENV" install -q ${NARROWGATE_TORCH:-torch==2.14.1 torchvision==0.29.1}
    ng_pip "$VENV" install -q --upgrade --upgrade-strategy eager -e "$ROOT[test,docs,release]"
    ;;
  oldest)
    ng_pip "$VENV" install -q uv
    "$VENV/bin/uv" pip compile -q "$ROOT/pyproject.toml" --extra test --extra docs --extra release --resolution lowest-direct \
      --python "$VENV/bin/python" --no-header -o "$VENV/oldest.txt"
    ng_pip "$VENV" install -q -r "$VENV/oldest.txt"
    ng_pip "$VENV" install -q --no-deps -e "$ROOT"
    ;;
  *)
    echo "narrowgate: --deps takes latest or oldest, not '$MODE'." >&2
    exit 2
    ;;
esac
ng_pip "$VENV" check
ng_pip "$VENV" freeze --exclude-editable > "$VENV/versions.txt"
echo "narrowgate: --deps $MODE: $(grep -Ei '^(torch|torchvision|transformers|accelerate|peft|tokenizers|numpy)==' "$VENV/versions.txt" | tr '\n' ' ')" >&2
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q --durations=15 -n "${NARROWGATE_TEST_WORKERS:-auto}" --maxprocesses 4 "$@"
