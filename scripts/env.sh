# Source me: creates .venv in the checkout and installs exactly requirements.lock, then narrowgate
# itself (editable, no dependencies). A failed install stops here with pip's own message.
#
# Torch: the lock pins the torch/torchvision pair this machine's pip serves (a build that runs on CPU
# and GPU). To keep a torch you installed into .venv yourself (e.g. a specific CUDA build), or to ask
# for another pair with NARROWGATE_TORCH="torch==X torchvision==Y", the lock's torch, torchvision,
# triton and nvidia-*/cuda-* lines are left out and yours is kept. NARROWGATE_LOCK=none installs from
# pyproject.toml's ranges instead (for a platform the lock was not made on). See docs/getting-started.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NARROWGATE_VENV:-$ROOT/.venv}"
LOCK="$ROOT/requirements.lock"
PY="${PYTHON:-python3}"

source "$ROOT/scripts/pip.sh"
_ng_pip() { ng_pip "$VENV" "$@"; }

_ng_install() {
  local torch_lines='^(torch|torchvision|triton|nvidia-[a-z0-9-]*|cuda-[a-z0-9-]*)=='
  local keep_torch=""
  if [ -n "${NARROWGATE_TORCH:-}" ]; then
    # shellcheck disable=SC2086
    _ng_pip install -q $NARROWGATE_TORCH
    keep_torch=1
  elif "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    local have want
    have="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    want="$(grep -E '^torch==' "$LOCK" | cut -d= -f3)"
    if [ "$have" != "$want" ]; then
      echo "narrowgate: keeping the torch $have already in $VENV (the lock has $want)" >&2
      keep_torch=1
    fi
  fi
  if [ "${NARROWGATE_LOCK:-}" = "none" ]; then
    [ -n "$keep_torch" ] || _ng_pip install -q "torch==2.14.1" "torchvision==0.29.1"
    _ng_pip install -q -e "$ROOT[test,docs,release]"
    return
  fi
  local made here
  made="$(sed -n 's/^# platform: //p' "$LOCK")"
  here="$("$VENV/bin/python" -c 'import platform, sys; print(f"cpython-{sys.version_info[0]}.{sys.version_info[1]} {sys.platform}-{platform.machine()}")')"
  if [ "$made" != "$here" ]; then
    echo "narrowgate: requirements.lock was made for $made, this is $here." >&2
    echo "  Regenerate it here with 'bash scripts/lock.sh', or install from pyproject.toml's ranges with NARROWGATE_LOCK=none." >&2
    return 1
  fi
  local want="$VENV/.narrowgate-lock.txt"
  if [ -n "$keep_torch" ]; then
    grep -v '^#' "$LOCK" | grep -Ev "$torch_lines" > "$want"
  else
    grep -v '^#' "$LOCK" > "$want"
  fi
  _ng_pip install -q "$(grep -E '^pip==' "$want")"
  _ng_pip install -q --no-deps -r "$want"
  _ng_pip install -q --no-deps --no-build-isolation -e "$ROOT"
  _ng_pip check >&2
  local got="$VENV/.narrowgate-freeze.txt"
  _ng_pip freeze --all --exclude-editable | LC_ALL=C sort -f > "$got"
  if [ -n "$keep_torch" ]; then
    grep -Ev "$torch_lines" "$got" > "$got.tmp" && mv "$got.tmp" "$got"
  fi
  local missing extra
  # comm compares bytes: sort both sides the same way (no case folding) or it refuses unpairable lines.
  missing="$(LC_ALL=C comm -23 <(LC_ALL=C sort "$want") <(LC_ALL=C sort "$got"))"
  extra="$(LC_ALL=C comm -13 <(LC_ALL=C sort "$want") <(LC_ALL=C sort "$got"))"
  if [ -n "$missing" ]; then
    echo "narrowgate: $VENV does not hold these versions of requirements.lock:" >&2
    echo "$missing" | sed 's/^/  /' >&2
    echo "  Remove $VENV and rerun, or regenerate the lock with 'bash scripts/lock.sh'." >&2
    return 1
  fi
  if [ -n "$extra" ]; then
    echo "narrowgate: $VENV also holds packages the lock does not name (yours): $(echo "$extra" | tr '\n' ' ')" >&2
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "narrowgate: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.narrowgate-install"
WANT="$(cat "$ROOT/pyproject.toml" "$LOCK" | sha256sum | cut -d' ' -f1)${NARROWGATE_LOCK:+-$NARROWGATE_LOCK}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "narrowgate: installing requirements.lock into $VENV" >&2
  _ng_install
  "$VENV/bin/python" -c "import narrowgate, torch, torchvision" >&2
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
