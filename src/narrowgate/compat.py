"""Every use of transformers (and PyTorch) internals and of version-specific names, in one place.

narrowgate supports the transformers releases that `pyproject.toml` admits (see the
compatibility table in docs/compatibility.md). When a release renames something, the fix belongs here and nowhere else;
each branch names the versions it is for.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version as _dist_version
from typing import TYPE_CHECKING, Any, Literal

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, LinearAttentionLayer

# Internals the engine and the adapters build on (present under these names in 5.0 - 5.25).
from transformers.image_processing_utils import select_best_resolution
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE
from transformers.utils import is_torchvision_available

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TRANSFORMERS = Version(_dist_version("transformers"))

#: The name under which a model's forward, its decoder layers, `generate` and the model outputs
#: carry the KV cache: ``cache`` from 5.24 on (the old name only warns as an argument and is gone
#: from outputs), ``past_key_values`` before.
CACHE_ARG = "cache" if Version("5.24.0") <= TRANSFORMERS else "past_key_values"


def cache_kwargs(cache) -> dict:
    """Keyword arguments that hand ``cache`` to a model's forward or to ``generate``."""
    return {CACHE_ARG: cache}


def layer_cache(kwargs: dict) -> Cache | None:
    """The KV cache a decoder layer was called with (None without one)."""
    return kwargs.get(CACHE_ARG)


def mixer_cache(kwargs: dict) -> Cache | None:
    """The cache a recurrent token mixer (a Gated DeltaNet layer) was called with: ``cache`` from 5.24,
    ``cache_params`` before; None without one."""
    return kwargs.get(CACHE_ARG, kwargs.get("cache_params"))


def _holds_positions(layer_cache: object) -> bool:
    """Whether a cache layer holds keys and values per position (an attention layer; a linear-attention layer that
    also attends, as `LinearAttentionAndFullAttentionLayer`), not only a recurrent state."""
    return isinstance(layer_cache, CacheLayerMixin)


def past_length(cache, layer: int) -> int | None:
    """How many positions ``cache`` held before the current call, as decoder layer ``layer`` sees it.

    A linear-attention layer's cache holds a state, not positions: ``Cache.get_seq_length(layer)`` raises there
    (5.23 - 5.24) or counts the tokens the layer's own state has taken in (5.25), which a suffix pass over a shared
    prefix never gave it. Layer 0 then reads the first attention layer's length, which this call has not yet
    extended; a later layer gets None (the caller keeps what an earlier layer of the same call read)."""
    layers = getattr(cache, "layers", None)
    if layers is not None and layer < len(layers):
        if _holds_positions(layers[layer]):
            return int(layers[layer].get_seq_length())
        if layer:
            return None
        return next((int(c.get_seq_length()) for c in layers if _holds_positions(c)), 0)
    try:
        return int(cache.get_seq_length(layer))
    except TypeError:
        return int(cache.get_seq_length())


def cached_positions(cache) -> int:
    """How many positions the attention layers of ``cache`` hold (a hybrid decoder's linear-attention layers
    hold a state only: `past_length`)."""
    return past_length(cache, 0) or 0


def gated_delta_rule(module: torch.nn.Module) -> Callable[..., Any] | None:
    """The chunked gated delta rule a Gated DeltaNet module's own forward runs: ``torch_chunk_gated_delta_rule``
    of its modeling file (5.23 - 5.25; a hub kernel where transformers' kernels are enabled). None where missing."""
    import sys

    return getattr(sys.modules.get(type(module).__module__), "torch_chunk_gated_delta_rule", None)


def recurrent_cache_states(cache, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The convolution and recurrent states a cache holds for a linear-attention layer (``get_conv_state`` /
    ``get_recurrent_state``, 5.23 - 5.25), written in place to hand a layer another state; None before the first call."""
    return cache.get_conv_state(layer), cache.get_recurrent_state(layer)


def cache_kv(cache, layers) -> list[tuple | None]:
    """Per decoder layer (``layers``), the (keys, values) its attention sees for the cached positions, each
    [B, kv_heads, length, head_dim] (``Cache.layers[i].keys/.values`` in 5.0 - 5.25); None for a recurrent layer,
    which holds neither. Multi-head latent attention (DeepSeek-V3's, Kimi-K2.5's) caches its compressed latent and
    rotary key instead and expands them on every call with its ``expand_kv`` (5.24): so is it done here."""
    out: list[tuple | None] = []
    for layer, cached in zip(layers, cache.layers):
        if not hasattr(cached, "keys"):
            out.append(None)
            continue
        expand = getattr(getattr(layer, "self_attn", None), "expand_kv", None)
        out.append(expand(cached.keys, cached.values) if callable(expand) else (cached.keys, cached.values))
    return out


class _PrefixLayer(DynamicLayer):
    """A cache layer that reports a fixed prefix and stores nothing: ``update`` hands back the new keys and
    values alone, and narrowgate's attention reads the prefix itself (so it is never copied per row)."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


class _StatelessRecurrentLayer(LinearAttentionLayer):
    """A linear-attention cache layer that never holds a state: every call starts afresh, and narrowgate's engine
    hands the recurrent layer its past itself (`engine.recurrent`). ``LinearAttentionLayer`` of 5.23 - 5.25."""

    def update_conv_state(
        self, conv_states: torch.Tensor, state_idx: int = 0, conv_kernel_size: int | None = None, **kwargs: Any
    ) -> torch.Tensor:
        return conv_states

    def update_recurrent_state(self, recurrent_states, state_idx: int = 0, **kwargs):
        return recurrent_states


class PrefixCache(Cache):
    """A read-only stand-in for a KV cache of ``length`` positions, shared by any number of batch rows.

    The model sees an ordinary cache of that length (positions, masks); the keys and values live with
    narrowgate's engine, which attends to them for every row without expanding them (5.0 - 5.25 Cache API).
    The layers in ``recurrent`` (a hybrid decoder's) hold no state: the engine computes them over the prefix.
    """

    def __init__(self, n_layers: int, length: int, recurrent=()):
        super().__init__(
            layers=[_StatelessRecurrentLayer() if l in recurrent else _PrefixLayer(length) for l in range(n_layers)]
        )


def prefix_pass_cache(n_layers: int, recurrent=()) -> Cache:
    """The cache a shared prefix is computed into: every position of every attention layer (the model's own cache
    would keep only the last window of a sliding-window layer, and the suffix attends to the whole prefix through
    its mask); the layers in ``recurrent`` hold no state (the engine keeps their projections instead)."""
    if not recurrent:
        return DynamicCache()
    return Cache(layers=[_StatelessRecurrentLayer() if l in recurrent else DynamicLayer() for l in range(n_layers)])


def _flash_cpu():
    """PyTorch's fused CPU attention that also returns the log-sum-exp of each row (private; the public
    ``scaled_dot_product_attention`` dispatches to it but drops the log-sum-exp). None where it is missing or
    behaves otherwise than expected (checked once on a small case); callers then compute the same by hand."""
    op = getattr(getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None), "default", None)
    if op is None:
        return None
    try:
        q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
        bias = torch.zeros(1, 1, 3, 5)
        bias[..., 0] = torch.finfo(torch.float32).min
        out, lse = op(q, k, v, 0.0, False, attn_mask=bias, scale=0.5)
        scores = (q @ k.transpose(2, 3)) * 0.5 + bias
        ok = torch.allclose(out, torch.softmax(scores, -1) @ v, atol=1e-5) and torch.allclose(
            lse.reshape(1, 1, 3), torch.logsumexp(scores, -1), atol=1e-5
        )
    except (RuntimeError, TypeError):
        return None
    return op if ok else None


#: ``flash_cpu(q, k, v, 0.0, False, attn_mask=additive_bias, scale=s) -> (output, logsumexp)`` or None.
flash_cpu = _flash_cpu()


def attn_implementation(config) -> str | None:
    """The attention implementation a (sub-)config is set to (``config._attn_implementation``, 5.0 - 5.25)."""
    return getattr(config, "_attn_implementation", None)


def name_or_path(config) -> str:
    """Where a model was loaded from: its hub id or local directory (``config._name_or_path``, 5.0 - 5.25)."""
    return getattr(config, "_name_or_path", "") or ""


def commit_hash(config) -> str | None:
    """The hub revision a model was loaded at, None for a local directory (``config._commit_hash``, 5.0 - 5.25)."""
    return getattr(config, "_commit_hash", None)


def image_text_to_text_class(config: Any) -> type[PreTrainedModel] | None:
    """The auto class for ``config``'s model type (``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING``, 5.0 - 5.25); None
    when the type has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    try:  # the mapping's type admits a tuple of classes (a tokenizer mapping's); a model mapping holds one class
        return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]  # type: ignore[return-value]
    except KeyError:
        return None


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


def checkpointing_context(layer: torch.nn.Module) -> Callable[..., Any] | Literal[False] | None:
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
    "PrefixCache",
    "ChameleonVQVAE",
    "TRANSFORMERS",
    "attn_implementation",
    "cache_kv",
    "cache_kwargs",
    "checkpointing_context",
    "commit_hash",
    "eager_mask",
    "enable_checkpointing",
    "flash_cpu",
    "gated_delta_rule",
    "image_text_to_text_class",
    "is_torchvision_available",
    "layer_cache",
    "mixer_cache",
    "name_or_path",
    "past_length",
    "prefix_pass_cache",
    "recurrent_cache_states",
    "repeat_kv",
    "sdpa_attention_forward",
    "sdpa_mask",
    "select_best_resolution",
    "transformers",
]
