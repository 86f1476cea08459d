"""The paper's experiments and ours, one module each, all run by `narrowgate.runner.run`.

An experiment is found the way any package's is: by its entry point in the ``narrowgate.experiments``
group (pyproject.toml; `narrowgate.catalog`), so adding one is adding its file and one line there.
`EXPERIMENTS` loads every one, narrowgate's and installed plugins', on first use.
"""

from __future__ import annotations

from typing import Any

from ..deprecation import moved
from .base import REGISTRY, Experiment, Unit, register

#: Every experiment by its command name, in the order of `narrowgate run --help` (loaded on first use).
EXPERIMENTS: dict[str, type[Experiment]]

__all__ = ["EXPERIMENTS", "REGISTRY", "Experiment", "Unit", "register"]

_moved = moved(__name__, "0.3.0", "0.4.0", run="narrowgate.runner")


def __getattr__(name: str) -> Any:
    if name == "EXPERIMENTS":
        from ..catalog import EXPERIMENTS_GROUP, load_experiment, points

        value = {n: load_experiment(n) for n in sorted(points(EXPERIMENTS_GROUP))}
        globals()["EXPERIMENTS"] = value
        return value
    return _moved(name)
