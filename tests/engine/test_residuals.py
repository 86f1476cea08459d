"""Residual capture and patching: agreement with the model's own hidden states, and exact compositions."""

from __future__ import annotations

import pytest
import torch

import narrowgate as ng
from tests.engine.conftest import same_prompt

ATOL = 1e-5


@pytest.mark.parametrize("role", ["eoi", "last", "last_image", "image[2]"])
def test_capture_equals_output_hidden_states(mixed, role):
    vlm, batch = mixed
    out = vlm.forward(batch, capture=ng.Capture(role))
    res = out.residuals[role]
    assert res.shape == (batch.size, vlm.n_layers + 1, vlm.hidden_size)
    with torch.no_grad():
        hs = vlm.model(**vlm.model_inputs(batch), output_hidden_states=True, use_cache=False).hidden_states
    assert len(hs) == vlm.n_layers + 1
    pos = batch.index(role)
    rows = torch.arange(batch.size)
    for l in range(vlm.n_layers):
        torch.testing.assert_close(res[:, l], hs[l][rows, pos].float(), atol=ATOL, rtol=0)
    # HF's last entry is after the final norm; ours is the last layer's raw output.
    norm = vlm.family.final_norm(vlm.model)
    torch.testing.assert_close(norm(res[:, -1]), hs[-1][rows, pos].float(), atol=ATOL, rtol=0)


def test_capture_mean_and_layer_subset(mixed):
    vlm, batch = mixed
    full = vlm.forward(batch, capture=ng.Capture("internal_image")).residuals["internal_image"]
    some = vlm.forward(batch, capture=ng.Capture("internal_image", resids=(0, vlm.n_layers))).residuals
    torch.testing.assert_close(some["internal_image"], full[:, [0, vlm.n_layers]], atol=0, rtol=0)
    with torch.no_grad():
        hs = vlm.model(**vlm.model_inputs(batch), output_hidden_states=True, use_cache=False).hidden_states
    for b, pos in enumerate(batch.positions("internal_image")):
        torch.testing.assert_close(full[b, 1], hs[1][b, pos].float().mean(0), atol=ATOL, rtol=0)


def test_patch_with_own_value_changes_nothing(mixed):
    vlm, batch = mixed
    base = vlm.forward(batch, capture=ng.Capture("eoi"))
    patches = [ng.Patch("eoi", l, base.residuals["eoi"][:, l]) for l in range(vlm.n_layers + 1)]
    out = vlm.forward(batch, patches=patches)
    torch.testing.assert_close(out.logits, base.logits, atol=ATOL, rtol=0)


def test_patch_other_image_changes_output(loaded, family):
    vlm = loaded(family)
    batch = same_prompt(vlm)
    base = vlm.forward(batch, capture=ng.Capture("eoi"))
    swapped = base.residuals["eoi"].flip(0)
    layer = vlm.n_layers // 2
    out = vlm.forward(batch, patches=[ng.Patch("eoi", layer, swapped[:, layer])])
    eoi = int(batch.index("eoi")[0])
    torch.testing.assert_close(out.logits[:, :eoi], base.logits[:, :eoi], atol=ATOL, rtol=0)
    assert (out.logits[:, eoi:] - base.logits[:, eoi:]).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_patches_and_knockouts_compose(loaded, family, mode):
    """Text blind to the image, [EOI] patched at every layer with image 2's: text behaves as with image 2."""
    vlm = loaded(family)
    batch = same_prompt(vlm)
    ko = ng.Knockout("image", "text", mode=mode)
    base = vlm.forward(batch, capture=ng.Capture("eoi"), knockouts=[ko])
    swapped = base.residuals["eoi"].flip(0)
    patches = [ng.Patch("eoi", l, swapped[:, l]) for l in range(vlm.n_layers)]
    out = vlm.forward(batch, knockouts=[ko], patches=patches)
    eoi = int(batch.index("eoi")[0])
    if mode == "mask":
        torch.testing.assert_close(out.logits[:, eoi + 1 :], base.logits.flip(0)[:, eoi + 1 :], atol=ATOL, rtol=0)
    assert (out.logits[:, eoi + 1 :] - base.logits[:, eoi + 1 :]).abs().max() > 1e-4


def test_patch_applies_during_generation(loaded, family):
    vlm = loaded(family)
    batch = same_prompt(vlm)
    base = vlm.forward(batch, capture=ng.Capture("eoi"))
    swapped = base.residuals["eoi"].flip(0)
    patches = [ng.Patch("eoi", l, swapped[:, l]) for l in range(vlm.n_layers)]
    ko = ng.Knockout("image", "text", mode="mask")
    gen = vlm.generate(batch, knockouts=[ko], patches=patches, max_new_tokens=5)
    ref = vlm.generate(batch, knockouts=[ko], max_new_tokens=5)
    assert torch.equal(gen[0, batch.length :], ref[1, batch.length :])
    assert torch.equal(gen[1, batch.length :], ref[0, batch.length :])


def test_batching_does_not_change_results(mixed):
    """A left-padded example gives the same logits and residuals as the same example alone."""
    vlm, batch = mixed
    from tests.fixtures.common import PROMPTS, images

    out = vlm.forward(batch, capture=ng.Capture(("eoi", "last")))
    for b, (img, prompt) in enumerate(zip(images(2, seed=1), PROMPTS)):
        alone = vlm.prepare([img], [prompt])
        one = vlm.forward(alone, capture=ng.Capture(("eoi", "last")))
        n = alone.length
        torch.testing.assert_close(out.logits[b, -n:], one.logits[0], atol=1e-4, rtol=0)
        for role in ("eoi", "last"):
            torch.testing.assert_close(out.residuals[role][b], one.residuals[role][0], atol=1e-4, rtol=0)


def test_capture_at_explicit_positions(mixed):
    vlm, batch = mixed
    text = batch.positions("text")
    picks = [int(t[1]) for t in text]
    out = vlm.forward(batch, capture=ng.Capture(roles=("eoi",), at={"pick": picks}))
    with torch.no_grad():
        hs = vlm.model(**vlm.model_inputs(batch), output_hidden_states=True, use_cache=False).hidden_states
    for b, p in enumerate(picks):
        torch.testing.assert_close(out.residuals["pick"][b, 2], hs[2][b, p].float(), atol=ATOL, rtol=0)
    with pytest.raises(ng.InterventionError, match="one position per example"):
        vlm.forward(batch, capture=ng.Capture(roles=(), at={"pick": picks[:1]}))


def test_a_second_vlm_on_the_same_model_does_not_hook_it_twice(mixed):
    """Hooks are installed once per model: captures and patches through either wrapper apply once."""
    from narrowgate.vlm import VLM

    vlm, batch = mixed
    before = vlm.forward(batch, capture=ng.Capture("eoi")).residuals["eoi"]
    other = VLM(vlm.model, vlm.processor)
    for wrapper in (vlm, other):
        torch.testing.assert_close(
            wrapper.forward(batch, capture=ng.Capture("eoi")).residuals["eoi"], before, atol=0, rtol=0
        )
