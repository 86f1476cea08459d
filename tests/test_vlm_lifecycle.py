"""A model handed to narrowgate is left as it was found: `VLM.close` restores attention, hooks and mode."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import narrowgate as ng
from narrowgate.engine.state import InterventionError
from tests.fixtures.common import images


def _hooks(layers) -> int:
    return sum(len(l._forward_pre_hooks) + len(l._forward_hooks) for l in layers)


@pytest.mark.parametrize("family", ["chameleon", "llava"])
def test_close_gives_the_model_back_as_it_was_found(checkpoint_dir, family):
    path = checkpoint_dir(family)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").train()
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "right"  # narrowgate pads on the left while it holds the model
    layers = model.get_decoder().layers
    before = (
        model.config.get_text_config()._attn_implementation,
        _hooks(layers),
        model.training,
        tokenizer.padding_side,
    )
    vlm = ng.VLM(model, processor)
    batch = vlm.prepare(images(2, seed=1), ["This shape is a"] * 2)
    stock = model(**vlm.model_inputs(batch)).logits
    assert vlm.attn_implementation.startswith("narrowgate") and _hooks(layers) > before[1] and not model.training
    assert tokenizer.padding_side == "left"
    with ng.VLM(model, processor) as second:  # a second wrapper shares the hooks; closing it keeps the first working
        second.forward(batch)
    assert _hooks(layers) > before[1]
    vlm.forward(batch, knockouts=[ng.Knockout("eoi", "text")])
    vlm.close()
    vlm.close()  # idempotent
    after = (
        model.config.get_text_config()._attn_implementation,
        _hooks(layers),
        model.training,
        tokenizer.padding_side,
    )
    assert after == before
    assert not hasattr(layers, "_narrowgate_hooks")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**vlm.model_inputs(batch)).logits, stock.detach(), rtol=0, atol=0)
    with pytest.raises(InterventionError, match="closed"):
        vlm.forward(batch)
