"""Interventions written outside the engine, each one file using only the public protocol (`narrowgate.Intervention`,
`narrowgate.Hook`); docs/contributing/intervention.md shows how to write one.

Every public class of a module here is importable from the package (``from narrowgate.interventions import
AddVector``), found on first use, so adding an intervention touches its own file only.
"""

from __future__ import annotations

import pkgutil
from importlib import import_module
from typing import Any


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def __getattr__(name: str) -> Any:
    for module in _modules():
        found = getattr(import_module(f"{__name__}.{module}"), name, None)
        if found is not None and not name.startswith("_"):
            globals()[name] = found
            return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    names = set(globals())
    for module in _modules():
        names |= {n for n in getattr(import_module(f"{__name__}.{module}"), "__all__", ())}
    return sorted(names)
