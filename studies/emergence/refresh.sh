#!/usr/bin/env bash
# Rewrite results.csv (ordered), emergence.png, verdict.json and summary.md from results.csv with the current code,
# e.g. while a study started with older code is still running. Run from the repository root.
set -euo pipefail
.venv/bin/python -c "
import pandas as pd
from pathlib import Path
from narrowgate.studies import emergence as em
em.finish(Path('studies/emergence'), pd.read_csv('studies/emergence/results.csv'))"
