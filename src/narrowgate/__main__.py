"""``python -m narrowgate``: the same command line as ``narrowgate`` (`narrowgate.cli`)."""

from .cli import main

main()
