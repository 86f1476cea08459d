#!/usr/bin/env bash
# Build the documentation site into site/ (warnings are errors: a broken link, a public object without a
# docstring or a tutorial that fails stops the build). Arguments go to `mkdocs build`, e.g. --site-dir DIR.
# The build runs the demo once on the shipped organisms for its figures (into .cache/docs-demo/, reused later)
# and executes the tutorials; NARROWGATE_DOCS_DEMO=DIR reuses a demo output (see scripts/docs_hooks.py).
source "$(dirname "$0")/env.sh"
export NO_MKDOCS_2_WARNING=1  # the theme's end-of-life notice (docs/index.md says what follows from it)
exec python -m mkdocs build --strict "$@"
