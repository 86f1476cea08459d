# Source me: creates .venv in the checkout and installs narrowgate with what it needs, when missing.
# torch and torchvision are pinned to a pair this machine's pip serves from local disk (transformers'
# Pixtral and LLaVA-OneVision processors need torchvision); NARROWGATE_TORCH overrides the pair, and a
# torch already installed in the venv is kept (see README, "GPU install").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "narrowgate: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.narrowgate-install"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "narrowgate: installing dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q ${NARROWGATE_TORCH:-torch==2.14.1 torchvision==0.29.1} 2>&1 | grep -v '^WARNING: Location' >&2 || true
  fi
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$VENV/bin/python" -c "import narrowgate, torch, torchvision" >&2
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
