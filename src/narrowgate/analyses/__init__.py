"""The paper's experiments and ours, one module each, all run by `narrowgate.runner.run`.

Every module of this package is imported here, so an experiment registers itself (``@register``) by
existing: adding one is adding its file.
"""

import importlib
import pkgutil

from ..deprecation import moved, moved_module
from .base import REGISTRY, Experiment, Unit, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

#: Every experiment by its command name, in the order of `narrowgate run --help`.
EXPERIMENTS: dict[str, type[Experiment]] = dict(sorted(REGISTRY.items()))

__all__ = ["EXPERIMENTS", "Experiment", "Unit", "register"]

#: Names that lived here until 0.2 and their new homes (still importable from here, with a warning, until 0.4.0).
#: The moved modules have no file left here, so the loop above never imports (and warns about) them.
__getattr__ = moved(
    __name__, "0.3.0", "0.4.0", run="narrowgate.runner", prompts="narrowgate.data", tasks="narrowgate.data"
)
for _moved in ("prompts", "tasks"):
    moved_module(f"{__name__}.{_moved}", f"narrowgate.data.{_moved}", "0.3.0", "0.4.0")
