"""Chameleon: load the tiny checkpoint, check every role against the token ids, run forward and generate."""

from __future__ import annotations

import pytest
import torch

from tests.families.checks import check_bracketed_span
from tests.fixtures.common import PROMPTS, images


@pytest.fixture(scope="module")
def vlm(loaded):
    return loaded("chameleon")


def test_family_and_prompt(vlm):
    assert vlm.family.name == "chameleon"
    assert vlm.family.prompt("Hi?", image_first=True) == "<image>Hi?"
    assert vlm.family.prompt("Hi?", image_first=False) == "Hi?<image>"


@pytest.mark.parametrize("image_first", [True, False])
def test_roles_match_token_ids(vlm, image_first):
    batch = vlm.prepare(images(2), PROMPTS, image_first=image_first)
    ids = batch.input_ids
    proc, tok = vlm.processor, vlm.family.tokenizer
    boi_id, eoi_id = tok.convert_tokens_to_ids("<racm3:break>"), tok.convert_tokens_to_ids("<eoss>")
    assert vlm.family.boi_id == boi_id and vlm.family.eoi_id == eoi_id
    assert ids.shape[0] == 2 and batch.first[0] != batch.first[1]  # different prompt lengths, left padded
    assert not bool((ids == tok.sep_token_id).any())  # text completion: no separator appended
    for b in range(2):
        img, _, _ = check_bracketed_span(batch, b, proc.image_token_id, boi_id, eoi_id, proc.image_seq_length)
        assert torch.equal(img, torch.arange(int(img[0]), int(img[-1]) + 1))
        assert int(ids[b, batch.index("bos")[b]]) == tok.bos_token_id
    if not image_first:  # the prompt ends with the image: eoi is the last position, no text after it
        assert batch.index("eoi").tolist() == [ids.shape[1] - 1] * 2
    assert batch.index("last").tolist() == [ids.shape[1] - 1] * 2


def test_image_span_matches_the_vq_token_count(vlm):
    """The model's VQ-VAE yields one image token per <image> placeholder of the span."""
    batch = vlm.prepare(images(2), PROMPTS)
    with torch.no_grad():
        bpe = vlm.model.model.get_image_tokens(batch.inputs["pixel_values"])
    assert bpe.shape == (2, vlm.processor.image_seq_length)
    assert all(p.numel() == bpe.shape[1] for p in batch.positions("image"))
    assert set(bpe.flatten().tolist()) <= set(vlm.model.model.vocabulary_mapping.image_tokens)
