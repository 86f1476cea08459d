"""An independent eager reference for knockouts: stock eager attention with entries edited by hand.

The reference is registered under its own name and set on a separately loaded HF model, so it
shares no code with the engine under test. On a hybrid decoder its Gated DeltaNet layers are replaced by the
hand-written float64 recurrence of `recurrent_reference`, reading the same `EDITS`.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AutoModelForImageTextToText

from narrowgate.compat import AttentionMaskInterface, eager_mask
from tests.engine import recurrent_reference

NAME = "ngtest_reference"
#: {"mask": [(layers, target[B,T], source[B,T])], "zero": [...]} set by a test before each call.
EDITS: dict[str, list] = {"mask": [], "zero": []}
LAYER_OF: dict[int, int] = {}


def _rep(x, n):
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    n = getattr(module, "num_key_value_groups", 1)
    k, v = _rep(key, n), _rep(value, n)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    w = (query.double() @ k.double().transpose(2, 3)) * scale
    if kwargs.get("softcap") is not None:
        w = torch.tanh(w / kwargs["softcap"]) * kwargs["softcap"]
    if attention_mask is not None:
        w = w.masked_fill(attention_mask[:, :, :, : k.shape[2]] < -1, float("-inf"))
    layer = LAYER_OF.get(id(module))
    if layer is not None:
        for layers, tgt, src in EDITS["mask"]:
            if layers is None or layer in layers:
                w = w.masked_fill((tgt[:, :, None] & src[:, None, :])[:, None], float("-inf"))
    p = torch.softmax(w, dim=-1).nan_to_num(0.0)
    if layer is not None:
        for layers, tgt, src in EDITS["zero"]:
            if layers is None or layer in layers:
                p = p.masked_fill((tgt[:, :, None] & src[:, None, :])[:, None], 0.0)
    out = (p @ v.double()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), p.to(query.dtype)


AttentionInterface.register(NAME, reference_attention)
AttentionMaskInterface.register(NAME, eager_mask)


def reference_model(path, layers_of_vlm, dtype=torch.float32, vision_attn="eager"):
    """A fresh HF model on the reference attention, with its decoder attention modules indexed.

    ``vision_attn`` is the stock implementation left on the rest of the model (the vision tower).
    """
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=vision_attn).eval()
    config = model.config
    model.set_attn_implementation({"text_config": NAME} if "text_config" in config.sub_configs else NAME)
    LAYER_OF.clear()
    layers = layers_of_vlm(model)
    for l, layer in enumerate(layers):
        if hasattr(layer, "self_attn"):
            LAYER_OF[id(layer.self_attn)] = l
    recurrent_reference.install(layers, EDITS)  # hybrid decoders: their Gated DeltaNet layers, by hand
    return model
