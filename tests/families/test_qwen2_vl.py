"""Qwen2-VL and Qwen2.5-VL: load the tiny checkpoints, check every role against the token ids.

The Qwen2-VL adapter serves both architectures, so every test runs on both checkpoints.
"""

from __future__ import annotations

import pytest
import torch

from tests.families.checks import check_bracketed_span
from tests.fixtures.common import PROMPTS, images


def two_images():
    """Two images of different sizes, so their spans differ in length (9 and 25 tokens)."""
    return [images(1, size=24, seed=1)[0], images(1, size=40)[0]]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model_type(request):
    return request.param


@pytest.fixture(scope="module")
def vlm(loaded, model_type):
    return loaded(model_type)


def test_adapter(vlm, model_type):
    assert vlm.family.name == "qwen2_vl" and vlm.model.config.model_type == model_type
    tok = vlm.family.tokenizer
    assert vlm.family.content_ids == {tok.convert_tokens_to_ids("<|image_pad|>")}
    assert vlm.family.boi_id == tok.convert_tokens_to_ids("<|vision_start|>") == vlm.model.config.vision_start_token_id
    assert vlm.family.eoi_id == tok.convert_tokens_to_ids("<|vision_end|>") == vlm.model.config.vision_end_token_id
    assert not vlm.family.eol_ids
    assert tok.bos_token_id is None


@pytest.mark.parametrize("image_first", [True, False])
def test_roles_match_token_ids(vlm, image_first):
    batch = vlm.prepare(two_images(), PROMPTS, image_first=image_first)
    ids = batch.input_ids
    tok = vlm.family.tokenizer
    image_id = vlm.processor.image_token_id
    boi_id, eoi_id = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")
    merge = vlm.processor.image_processor.merge_size
    expected = (batch.inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
    assert ids.shape[0] == 2 and batch.first[0] != batch.first[1]  # different prompt lengths, left padded
    assert expected[0] != expected[1]  # different image sizes -> different span lengths
    for b in range(2):
        img, boi, eoi = check_bracketed_span(batch, b, image_id, boi_id, eoi_id, expected[b])
        assert batch.positions("bos")[b].numel() == 0  # Qwen has no BOS token
        assert int(batch.index("image[-1]")[b]) == int(img[-1])
        prompt_text = tok.decode(ids[b, eoi + 1 :]) if image_first else tok.decode(ids[b, batch.first[b] : boi])
        assert PROMPTS[b] in prompt_text
    assert batch.index("last").tolist() == [ids.shape[1] - 1] * 2
    with pytest.raises(Exception, match="bos"):
        batch.index("bos")


def test_raw_prompt(vlm, monkeypatch):
    """Without a chat template the adapter's raw Qwen template gives the same layout."""
    monkeypatch.setattr(vlm.processor, "chat_template", None)
    batch = vlm.prepare(two_images(), PROMPTS)
    assert "<|im_start|>assistant" in vlm.family.tokenizer.decode(batch.input_ids[0])
    for b in range(2):
        img = batch.positions("image")[b]
        assert int(batch.index("boi")[b]) == int(img[0]) - 1
        assert int(batch.input_ids[b, batch.index("eoi")[b]]) == vlm.family.eoi_id


def test_mrope_positions_are_the_models_own(vlm):
    """Forward with the adapter's M-RoPE positions equals the model's own forward; padding moves nothing."""
    ims = two_images()
    batch = vlm.prepare(ims, PROMPTS)
    out = vlm.forward(batch)
    assert out.logits.shape[:2] == batch.input_ids.shape and torch.isfinite(out.logits).all()
    # Left padding must not move M-RoPE positions: each example alone gives the same last logits.
    for b in range(2):
        alone = vlm.forward(vlm.prepare(ims[b : b + 1], PROMPTS[b : b + 1]))
        torch.testing.assert_close(alone.logits[0, -1], out.logits[b, -1], rtol=1e-4, atol=1e-4)
    # The adapter's M-RoPE positions are the model's own: image tokens share 2-D (height, width) positions.
    rope, _ = vlm.model.model.get_rope_index(
        batch.inputs["input_ids"],
        mm_token_type_ids=batch.inputs["mm_token_type_ids"],
        image_grid_thw=batch.inputs["image_grid_thw"],
        attention_mask=batch.inputs["attention_mask"],
    )
    assert torch.equal(vlm.family.position_ids(batch.inputs), rope)
    img = batch.positions("image")[0]
    assert rope[1, 0, img].unique().numel() < img.numel()  # rows share a height position
    with torch.no_grad():
        ref = vlm.model(**batch.inputs, use_cache=False).logits  # the model computes its own positions
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)
    gen = vlm.generate(batch, max_new_tokens=4)
    assert gen.shape == (2, batch.length + 4)
    assert torch.equal(gen[:, : batch.length], batch.input_ids)
