"""The paper's experiments and ours, one module each, all run by `narrowgate.runner.run`.

An experiment is found the way any package's is: by its entry point in the ``narrowgate.experiments``
group (pyproject.toml; `narrowgate.plugins`), so adding one is adding its file and one line there.
`EXPERIMENTS` loads every one, narrowgate's and installed plugins', on first use.
"""

from __future__ import annotations

from ..deprecation import moved, moved_module
from .base import REGISTRY, Experiment, Unit, register

#: Every experiment by its command name, in the order of `narrowgate run --help` (loaded on first use).
EXPERIMENTS: dict[str, type[Experiment]]

__all__ = ["EXPERIMENTS", "REGISTRY", "Experiment", "Unit", "register"]


def _experiments() -> dict[str, type[Experiment]]:
    from ..plugins import EXPERIMENTS_GROUP, load_all

    return {
        cls.name: cls
        for cls in sorted(load_all(EXPERIMENTS_GROUP, lambda: Experiment, "experiment"), key=lambda c: c.name)
    }


#: Names that lived here until 0.2 and their new homes (still importable from here, with a warning, until 0.4.0).
#: The moved modules have no file left here.
__getattr__ = moved(
    __name__,
    "0.3.0",
    "0.4.0",
    lazy={"EXPERIMENTS": _experiments},
    run="narrowgate.runner",
    prompts="narrowgate.data",
    tasks="narrowgate.data",
)
for _moved in ("prompts", "tasks"):
    moved_module(f"{__name__}.{_moved}", f"narrowgate.data.{_moved}", "0.3.0", "0.4.0")
