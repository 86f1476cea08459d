#!/usr/bin/env bash
# The main job, in a .venv created on first use: the demo on the three shipped model organisms
# (report in runs/demo/report.html; arguments go to `narrowgate demo`, e.g. --out DIR).
source "$(dirname "$0")/env.sh"
exec narrowgate demo "$@"
