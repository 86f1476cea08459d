"""Model-family adapters, one file each, and the registry that picks one from ``config.model_type``.

Every adapter, narrowgate's and any installed package's, is found by its entry point in the
``narrowgate.families`` group (pyproject.toml; `narrowgate.plugins`): `FAMILIES` loads them on first use.
A model type no dedicated adapter accepts gets the `Generic` adapter when its config allows one (a decoder
reading image placeholder tokens); otherwise `detect` refuses, saying why."""

from __future__ import annotations

from typing import Any

from ..errors import NarrowgateError
from .base import Family, ImageLayout, LayoutError
from .generic import Generic, out_of_scope, refusal

#: Every dedicated adapter (entry points, loaded on first use); exactly one accepts a given model (Pixtral and
#: LLaVA are both ``llava`` models, told apart by their own ``accepts`` on the vision tower), so the order is
#: only the order of `narrowgate models`: narrowgate's own by name, then the plugins'.
FAMILIES: tuple[type[Family], ...]


def __getattr__(name: str) -> Any:
    if name == "FAMILIES":
        from ..plugins import FAMILIES_GROUP, load_all

        value = load_all(FAMILIES_GROUP, lambda: Family, "family")
        globals()["FAMILIES"] = value
        return value
    if name.startswith("_"):  # dunder probes (inspect, pickle...) load nothing
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    own = {cls.__name__: cls for cls in _families() if cls.__module__.startswith(f"{__name__}.")}
    if name in own:  # narrowgate's adapters by class name (``from narrowgate.families import Llava``)
        return own[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _families() -> tuple[type[Family], ...]:
    """`FAMILIES`, loaded now if nothing has read it yet (a name lookup inside the module skips `__getattr__`)."""
    return globals()["FAMILIES"] if "FAMILIES" in globals() else __getattr__("FAMILIES")


class UnsupportedModelError(NarrowgateError, ValueError):
    """The model's type is not one narrowgate has an adapter for."""


class AmbiguousFamilyError(NarrowgateError, RuntimeError):
    """Two adapters (e.g. a plugin's and a built-in) both accept one model."""


def supported() -> str:
    """The families with a dedicated adapter and their model types, in one line (error messages use it)."""
    return "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in _families())


def family_for(model_type: str, vision_model_type: str | None = None) -> type[Family]:
    """The adapter class for a ``config.model_type``; raises naming the supported families."""
    matches = [f for f in _families() if model_type in f.model_types and f.accepts(vision_model_type)]
    if not matches:
        raise UnsupportedModelError(
            f"narrowgate has no adapter for model type {model_type!r}. Supported families: {supported()}."
        )
    if len(matches) > 1:
        raise AmbiguousFamilyError(
            f"Adapters {', '.join(f'{f.name} ({f.__module__})' for f in matches)} all accept model type "
            f"{model_type!r} (vision tower {vision_model_type!r}): uninstall one of the packages, or make each "
            "adapter's accepts() decide alone."
        )
    return matches[0]


def detect(config: Any) -> type[Family]:
    """The adapter class for a model config: its dedicated adapter, else `Generic` where the config allows."""
    vision = getattr(config, "vision_config", None)
    try:
        return family_for(config.model_type, getattr(vision, "model_type", None))
    except UnsupportedModelError as e:
        why = refusal(config)
        if why is None:
            return Generic
        raise UnsupportedModelError(f"{e} The generic adapter does not apply either: {why}.") from None


__all__ = [
    "FAMILIES",
    "AmbiguousFamilyError",
    "Family",
    "Generic",
    "ImageLayout",
    "LayoutError",
    "UnsupportedModelError",
    "detect",
    "family_for",
    "out_of_scope",
    "refusal",
    "supported",
]
