"""Model-family adapters, one file each, and the registry that picks one from ``config.model_type``.

A model type no dedicated adapter accepts gets the `Generic` adapter when its config allows one (a decoder
reading image placeholder tokens); otherwise `detect` refuses, saying why."""

from __future__ import annotations

from ..errors import NarrowgateError
from .base import Family, ImageLayout, LayoutError
from .chameleon import Chameleon
from .emu3 import Emu3
from .generic import Generic, out_of_scope, refusal
from .idefics3 import Idefics3
from .janus import Janus
from .lighton_ocr import LightOnOcr
from .llava import Llava
from .llava_next import LlavaNext
from .llava_onevision import LlavaOneVision
from .ovis2 import Ovis2
from .pixtral import Pixtral
from .qwen2_vl import Qwen2VL

#: Every adapter; exactly one accepts a given model (Pixtral and LLaVA are both ``llava`` models, told apart
#: by their own ``accepts`` on the vision tower), so the order is only the order of `narrowgate models`.
FAMILIES: tuple[type[Family], ...] = (
    Chameleon,
    Emu3,
    Pixtral,
    Llava,
    LlavaNext,
    LlavaOneVision,
    Idefics3,
    Janus,
    Qwen2VL,
    LightOnOcr,
    Ovis2,
)


class UnsupportedModelError(NarrowgateError, ValueError):
    """The model's type is not one narrowgate has an adapter for."""


def supported() -> str:
    """The families with a dedicated adapter and their model types, in one line (error messages use it)."""
    return "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)


def family_for(model_type: str, vision_model_type: str | None = None) -> type[Family]:
    """The adapter class for a ``config.model_type``; raises naming the supported families."""
    matches = [f for f in FAMILIES if model_type in f.model_types and f.accepts(vision_model_type)]
    if not matches:
        raise UnsupportedModelError(
            f"narrowgate has no adapter for model type {model_type!r}. Supported families: {supported()}."
        )
    if len(matches) > 1:
        raise RuntimeError(
            f"Adapters {[f.name for f in matches]} all accept model type {model_type!r} "
            f"(vision tower {vision_model_type!r}); each adapter's accepts() must decide alone."
        )
    return matches[0]


def detect(config) -> type[Family]:
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
