"""Every use of transformers internals and of version-specific names, in one place.

narrowgate supports the transformers releases that `pyproject.toml` admits (see the README's
compatibility table). When a release renames something, the fix belongs here and nowhere else;
each branch names the versions it is for.
"""

from __future__ import annotations

from importlib.metadata import version as _dist_version

import transformers
from packaging.version import Version

# Internals the engine and the adapters build on (present under these names in 5.0 - 5.24).
from transformers.image_processing_utils import select_best_resolution
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE
from transformers.utils import is_torchvision_available

TRANSFORMERS = Version(_dist_version("transformers"))

#: The name under which a model's forward, its decoder layers, `generate` and the model outputs
#: carry the KV cache: ``cache`` from 5.24 on (the old name only warns as an argument and is gone
#: from outputs), ``past_key_values`` before.
CACHE_ARG = "cache" if TRANSFORMERS >= Version("5.24.0") else "past_key_values"


def cache_kwargs(cache) -> dict:
    """Keyword arguments that hand ``cache`` to a model's forward or to ``generate``."""
    return {CACHE_ARG: cache}


def output_cache(output):
    """The KV cache a forward returned (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    return getattr(output, CACHE_ARG)


def layer_cache(kwargs: dict):
    """The KV cache a decoder layer was called with (None without one)."""
    return kwargs.get(CACHE_ARG)


def enable_checkpointing(model, context_fn) -> None:
    """Non-reentrant gradient checkpointing whose recompute enters ``context_fn``'s second context.

    ``activation_checkpointing_enable`` from 5.24 (``gradient_checkpointing_enable`` is its deprecated
    alias there, the only name before).
    """
    kwargs = {"use_reentrant": False, "context_fn": context_fn}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_context(layer):
    """The ``context_fn`` a decoder layer's gradient checkpointing uses; False when checkpointing is off.

    Reads ``gradient_checkpointing`` / ``_gradient_checkpointing_func`` (a ``functools.partial`` of
    ``torch.utils.checkpoint.checkpoint``), the attributes every 5.x release sets on its layers.
    """
    if not getattr(layer, "gradient_checkpointing", False):
        return False
    func = getattr(layer, "_gradient_checkpointing_func", None)
    return getattr(func, "keywords", {}).get("context_fn")


__all__ = [
    "AttentionMaskInterface",
    "BaseModelOutputWithPooling",
    "CACHE_ARG",
    "ChameleonVQVAE",
    "TRANSFORMERS",
    "cache_kwargs",
    "checkpointing_context",
    "enable_checkpointing",
    "eager_mask",
    "is_torchvision_available",
    "layer_cache",
    "output_cache",
    "repeat_kv",
    "sdpa_attention_forward",
    "sdpa_mask",
    "select_best_resolution",
    "transformers",
]
