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


__all__ = [
    "AttentionMaskInterface",
    "BaseModelOutputWithPooling",
    "CACHE_ARG",
    "ChameleonVQVAE",
    "TRANSFORMERS",
    "cache_kwargs",
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
