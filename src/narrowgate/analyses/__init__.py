"""The paper's experiments and ours, one module each, all run by `narrowgate.runner.run`.

An experiment is found the way any package's is: by its entry point in the ``narrowgate.experiments``
group (pyproject.toml; `narrowgate.catalog`), so adding one is adding its file and one line there.
`EXPERIMENTS` loads every one, narrowgate's and installed plugins', on first use.
"""

from __future__ import annotations

from ..deprecation import moved
from .base import REGISTRY, Experiment, Unit, register

#: Every experiment by its command name, in the order of `narrowgate run --help` (loaded on first use).
EXPERIMENTS: dict[str, type[Experiment]]

__all__ = ["EXPERIMENTS", "REGISTRY", "Experiment", "Unit", "register"]


def _experiments() -> dict[str, type[Experiment]]:
    from ..catalog import EXPERIMENTS_GROUP, load_experiment, points

    return {name: load_experiment(name) for name in sorted(points(EXPERIMENTS_GROUP))}


__getattr__ = moved(__name__, "0.3.0", "0.4.0", lazy={"EXPERIMENTS": _experiments}, run="narrowgate.runner")
