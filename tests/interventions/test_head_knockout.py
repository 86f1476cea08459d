"""HeadKnockout equals a plain forward pre-hook on the attention's output projection of a stock float64 model
(the heads' slices of its input zeroed, or replaced by their mean over the roles' positions): alone, among
conditions over a shared prefix, and in generation."""

from __future__ import annotations

import contextlib

import pytest
import torch

import narrowgate as ng
from narrowgate.interventions import HeadKnockout
from tests.engine.conftest import same_prompt
from tests.fixtures.common import PROMPTS, images
from tests.interventions.conftest import role_window, windows

LAYER = 1
ROLES = ("eoi", "text")


def _heads(vlm) -> tuple[int, ...]:
    return (0, vlm.shape.heads - 1)


@contextlib.contextmanager
def _ablating(model, layers, batch, heads, mode, means=None):
    mask = batch.mask(ROLES)
    attn = layers[LAYER].self_attn
    H = attn.config.num_attention_heads
    with windows(model) as state:

        def pre(module, args):
            x = args[0]
            split = x.view(*x.shape[:2], H, -1).clone()
            rows = role_window(mask, True, state["offset"], x.shape[1])
            for h in heads:
                if mode == "zero":
                    split[:, :, h][rows] = 0.0
                else:
                    split[:, :, h][rows] = split[:, :, h][rows].mean(0) if means is None else means[h].to(x.dtype)
            return (split.reshape(x.shape), *args[1:])

        handle = attn.o_proj.register_forward_pre_hook(pre)
        try:
            yield model
        finally:
            handle.remove()


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_head_knockout_equals_a_plain_hook(loaded, stock, family, mode):
    vlm = loaded(family, dtype="float64")
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    heads, model = _heads(vlm), stock(family)
    layers = vlm.family.decoder_layers(model)
    ko = HeadKnockout(LAYER, heads, ROLES, mode=mode)
    got = vlm.forward(batch, interventions=[ko]).logits
    with _ablating(model, layers, batch, heads, mode), torch.no_grad():
        want = model(**vlm.model_inputs(batch), use_cache=False).logits
    keep = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-6, rtol=0)
    assert (got[keep] - vlm.forward(batch).logits[keep]).abs().max() > 1e-4

    tokens = vlm.generate(batch, interventions=[ko], max_new_tokens=5)
    with _ablating(model, layers, batch, heads, mode), torch.no_grad():
        want_tokens = model.generate(**vlm.model_inputs(batch), max_new_tokens=5, **vlm._gen_kwargs({}))
    assert torch.equal(tokens, want_tokens.cpu())


def test_head_knockout_with_given_means(loaded, stock, family):
    """Means measured with a read-only hook on other images, then used as the replacement."""
    vlm = loaded(family, dtype="float64")
    seen = []
    reference_set = vlm.prepare(images(2, seed=7), PROMPTS)
    vlm.forward(reference_set, interventions=[ng.Hook("head", LAYER, ROLES, lambda v, w: seen.append(v[w.valid]))])
    means = torch.cat(seen).mean(0)  # [heads, D_head]
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    heads, model = _heads(vlm), stock(family)
    got = vlm.forward(batch, interventions=[HeadKnockout(LAYER, heads, ROLES, mode="mean", means=means)]).logits
    with _ablating(model, vlm.family.decoder_layers(model), batch, heads, "mean", means), torch.no_grad():
        want = model(**vlm.model_inputs(batch), use_cache=False).logits
    keep = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-6, rtol=0)


def test_head_knockouts_among_conditions_over_a_shared_prefix(loaded, stock, family):
    vlm = loaded(family, dtype="float64")
    batch = same_prompt(vlm)
    heads, model = _heads(vlm), stock(family)
    conds = {"baseline": [], **{m: [HeadKnockout(LAYER, heads, ROLES, mode=m)] for m in ("zero", "mean")}}
    got = vlm.forward_conditions(batch, conds)
    for mode in ("zero", "mean"):
        with _ablating(model, vlm.family.decoder_layers(model), batch, heads, mode), torch.no_grad():
            want = model(**vlm.model_inputs(batch), use_cache=False).logits[:, -1]
        torch.testing.assert_close(got[mode].last_logits, want.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["baseline"].last_logits, vlm.forward(batch).logits[:, -1].float(), atol=1e-6, rtol=0)


def test_head_knockout_refuses_heads_the_layer_lacks(loaded):
    vlm = loaded("llava")
    batch = vlm.prepare(images(2, seed=1), PROMPTS)
    with pytest.raises(ng.InterventionError, match="out of range"):
        vlm.forward(batch, interventions=[HeadKnockout(1, vlm.shape.heads)])
    with pytest.raises(ValueError, match="at least one head"):
        HeadKnockout(1, ())
