"""Janus: load the tiny checkpoint, check every role against the token ids, run forward and generate."""

from __future__ import annotations

import pytest

from tests.families.checks import check_bracketed_span
from tests.fixtures.common import PROMPTS, images


@pytest.fixture(scope="module")
def vlm(loaded):
    return loaded("janus")


def test_adapter(vlm):
    assert vlm.family.name == "janus"
    tok = vlm.family.tokenizer
    assert vlm.family.content_ids == {tok.convert_tokens_to_ids("<image_placeholder>")}
    assert vlm.family.boi_id == tok.convert_tokens_to_ids("<begin_of_image>")
    assert vlm.family.eoi_id == tok.convert_tokens_to_ids("<end_of_image>")
    assert not vlm.family.eol_ids


@pytest.mark.parametrize("image_first", [True, False])
def test_roles_match_token_ids(vlm, image_first):
    batch = vlm.prepare(images(2), PROMPTS, image_first=image_first)
    ids = batch.input_ids
    tok = vlm.family.tokenizer
    image_id = vlm.processor.tokenizer.convert_tokens_to_ids(vlm.processor.image_token)
    boi_id = tok.convert_tokens_to_ids("<begin_of_image>")
    eoi_id = tok.convert_tokens_to_ids("<end_of_image>")
    n_image = vlm.processor.num_image_tokens
    assert ids.shape[0] == 2 and batch.first[0] != batch.first[1]  # different prompt lengths, left padded
    for b in range(2):
        img, boi, eoi = check_bracketed_span(batch, b, image_id, boi_id, eoi_id, n_image)
        assert int(batch.index("image[-1]")[b]) == int(img[-1])
        bos = int(batch.index("bos")[b])
        assert bos == batch.first[b] and int(ids[b, bos]) == tok.bos_token_id
        assert int((ids[b] == tok.bos_token_id).sum()) == 1  # exactly one BOS
        prompt_text = tok.decode(ids[b, eoi + 1 :]) if image_first else tok.decode(ids[b, :boi])
        assert PROMPTS[b] in prompt_text
    assert batch.index("last").tolist() == [ids.shape[1] - 1] * 2


def test_default_system_prompt_precedes_image(vlm):
    """deepseek-community processors prepend a system prompt; it sits between BOS and the user turn."""
    assert vlm.processor.use_default_system_prompt
    batch = vlm.prepare(images(1), PROMPTS[:1])
    ids = batch.input_ids[0]
    before = vlm.family.tokenizer.decode(ids[batch.first[0] + 1 : int(batch.index("boi")[0])])
    assert before.startswith("You are a helpful language and vision assistant.")
    assert before.rstrip().endswith("<|User|>:")
