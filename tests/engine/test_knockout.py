"""Attention knockouts: exact invariances and agreement with an independent eager reference."""

from __future__ import annotations

import pytest
import torch

import narrowgate as ng
from tests.engine import reference
from tests.engine.conftest import same_prompt

ATOL = 1e-5


def _text_logits(out, batch):
    eoi = int(batch.index("eoi")[0])
    assert batch.index("eoi").tolist() == [eoi] * batch.size
    return out.logits[:, eoi:]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_image_knockout_mask_makes_text_blind(loaded, family, dtype):
    vlm = loaded(family, dtype=dtype)
    batch = same_prompt(vlm)
    ko = ng.Knockout(source="image", target=("eoi", "text"), mode="mask")
    base = _text_logits(vlm.forward(batch), batch)
    assert (base[0] - base[1]).abs().max() > 1e-4, "the two images must matter without the knockout"
    blind = _text_logits(vlm.forward(batch, knockouts=[ko]), batch)
    torch.testing.assert_close(blind[0], blind[1], atol=ATOL if dtype == "float32" else 1e-2, rtol=0)
    gen = vlm.generate(batch, knockouts=[ko], max_new_tokens=6)
    assert torch.equal(gen[0], gen[1])


def test_zero_mode_leaks_through_the_normaliser(loaded, family):
    """In zero mode the softmax normaliser still carries how much each head looked at the image."""
    vlm = loaded(family)
    batch = same_prompt(vlm)
    ko = ng.Knockout(source="image", target=("eoi", "text"), mode="zero")
    blind = _text_logits(vlm.forward(batch, knockouts=[ko]), batch)
    leak = (blind[0] - blind[1]).abs().max()
    assert leak > 1e-6


@pytest.mark.parametrize("mode", ["zero", "mask"])
@pytest.mark.parametrize("layers", [None, (1,)])
def test_eoi_knockout_matches_eager_reference(loaded, checkpoint_dir, family, mixed, mode, layers):
    vlm, batch = mixed
    ko = ng.Knockout(source="eoi", target="text", mode=mode, layers=layers)
    ours = vlm.forward(batch, knockouts=[ko]).logits
    ref_model = reference.reference_model(checkpoint_dir(family), vlm.family.decoder_layers)
    reference.EDITS.update(mask=[], zero=[])
    reference.EDITS[mode] = [(layers, batch.mask("text"), batch.mask("eoi"))]
    try:
        with torch.no_grad():
            ref = ref_model(**vlm.model_inputs(batch), use_cache=False).logits
    finally:
        reference.EDITS.update(mask=[], zero=[])
    plain = vlm.forward(batch).logits
    assert (plain - ref).abs().max() > 1e-4, "the knockout must change the logits"
    keep = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=ATOL, rtol=0)


KNOCKOUT_SETS = {
    "eoi-zero": [ng.Knockout("eoi", "text")],
    "image-mask": [ng.Knockout("image", ("eoi", "text"), mode="mask")],
    "mixed": [ng.Knockout("eoi", "text", layers=(0,)), ng.Knockout("last_image", "text", mode="mask", layers=(1, 2))],
    "eoi-self": [ng.Knockout(("eoi",), ("eoi", "text"))],
}


@pytest.mark.parametrize("name", sorted(KNOCKOUT_SETS))
def test_sdpa_and_eager_agree(loaded, family, name):
    sdpa, eager = loaded(family), loaded(family, attn="eager")
    assert sdpa.attn_implementation == "narrowgate_sdpa" and eager.attn_implementation == "narrowgate_eager"
    from tests.fixtures.common import PROMPTS, images

    batch_s = sdpa.prepare(images(2, seed=1), PROMPTS)
    batch_e = eager.prepare(images(2, seed=1), PROMPTS)
    kos = KNOCKOUT_SETS[name]
    a = sdpa.forward(batch_s, knockouts=kos).logits
    b = eager.forward(batch_e, knockouts=kos).logits
    keep = batch_s.inputs["attention_mask"].bool()
    torch.testing.assert_close(a[keep], b[keep], atol=ATOL, rtol=0)
    ga = sdpa.generate(batch_s, knockouts=kos, max_new_tokens=5)
    gb = eager.generate(batch_e, knockouts=kos, max_new_tokens=5)
    assert torch.equal(ga, gb)


def test_knockout_changes_generation_only_through_its_edges(loaded, family):
    """A knockout on a role that text never attends to through the blocked edge changes nothing."""
    vlm = loaded(family)
    batch = same_prompt(vlm)
    plain = vlm.forward(batch).logits
    # Queries at `bos` have only themselves to attend to; blocking image keys for them is a no-op.
    if batch.positions("bos")[0].numel():
        out = vlm.forward(batch, knockouts=[ng.Knockout("image", "bos", mode="mask")]).logits
        torch.testing.assert_close(out, plain, atol=ATOL, rtol=0)
    # Knocking out text -> image at a layer only changes positions after the image.
    out = vlm.forward(batch, knockouts=[ng.Knockout("image", "text", mode="mask")]).logits
    eoi = int(batch.index("eoi")[0])
    torch.testing.assert_close(out[:, : eoi + 1], plain[:, : eoi + 1], atol=ATOL, rtol=0)
    assert (out[:, eoi + 1 :] - plain[:, eoi + 1 :]).abs().max() > 1e-5
