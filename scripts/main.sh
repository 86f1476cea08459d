#!/usr/bin/env bash
# The main job, in a .venv created on first use.
source "$(dirname "$0")/env.sh"
exec narrowgate models "$@"
