#!/usr/bin/env bash
# Regenerate requirements.lock: a clean resolve of everything the README's commands install.
#
# Method: a throwaway venv gets the torch/torchvision pair (NARROWGATE_TORCH, default below) and then
# narrowgate[test,docs,release] from pyproject.toml's ranges with pip (the newest releases those ranges admit, as
# served by this machine's package index); `pip freeze --all --exclude-editable` of that venv is the
# lock. Run it, then `bash scripts/test.sh` (which installs exactly the new lock) before committing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
TORCH_PAIR="${NARROWGATE_TORCH:-torch==2.14.1 torchvision==0.29.1}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m venv "$TMP/venv"
V="$TMP/venv/bin/python"
source "$ROOT/scripts/pip.sh"
ng_pip "$TMP/venv" install -q --upgrade pip setuptools
# shellcheck disable=SC2086
ng_pip "$TMP/venv" install -q $TORCH_PAIR
ng_pip "$TMP/venv" install -q "$ROOT[test,docs,release]"
ng_pip "$TMP/venv" uninstall -q -y narrowgate
{
  echo "# narrowgate lock: every package the README's commands install, exact versions."
  echo "# Made by: bash scripts/lock.sh ($(date -u +%Y-%m-%d), $TORCH_PAIR + narrowgate[test,docs,release], pip $("$V" -m pip --version | cut -d' ' -f2))"
  echo "# platform: $("$V" -c 'import platform, sys; print(f"cpython-{sys.version_info[0]}.{sys.version_info[1]} {sys.platform}-{platform.machine()}")')"
  "$V" -m pip freeze --all --exclude-editable | LC_ALL=C sort -f
} > "$ROOT/requirements.lock"
echo "wrote $ROOT/requirements.lock ($(grep -vc '^#' "$ROOT/requirements.lock") packages)" >&2
