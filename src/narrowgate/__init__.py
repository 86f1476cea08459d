"""narrowgate: how visual information reaches the text inside vision-language models."""

from importlib import import_module
from typing import Any

from .errors import NarrowgateError
from .roles import ROLE_NAMES, RoleError

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)

# Imported on first use (PEP 562), so `narrowgate --help` and the error types do not load torch.
_LAZY = {
    "Batch": ".batch",
    "AttentionStats": ".engine.interventions",
    "Capture": ".engine.interventions",
    "Hook": ".engine.interventions",
    "Knockout": ".engine.interventions",
    "Patch": ".engine.interventions",
    "Condition": ".engine.shared",
    "Intervention": ".engine.protocol",
    "ModelShape": ".engine.protocol",
    "Resolved": ".engine.protocol",
    "RoleMask": ".engine.protocol",
    "SITES": ".engine.protocol",
    "Where": ".engine.protocol",
    "InterventionError": ".engine.state",
    "UnsupportedModelError": ".families",
    "supported": ".families",
    "LoadError": ".loading",
    "load": ".loading",
    "VLM": ".vlm",
    "Output": ".vlm",
    "Video": ".video",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'narrowgate' has no attribute {name!r}")


__all__ = [
    "AttentionStats",
    "Batch",
    "Capture",
    "Condition",
    "Hook",
    "Intervention",
    "InterventionError",
    "Knockout",
    "LoadError",
    "ModelShape",
    "NarrowgateError",
    "Output",
    "Patch",
    "ROLE_NAMES",
    "Resolved",
    "RoleError",
    "RoleMask",
    "SITES",
    "UnsupportedModelError",
    "VLM",
    "Video",
    "Where",
    "load",
    "supported",
]
