"""LightOnOCR: load the tiny checkpoint, check every role against the token ids, and show why the generic adapter
alone would not do (it expects the end-of-image token the tokenizer names, which no prompt holds)."""

from __future__ import annotations

import pytest
import torch

from narrowgate.families import Generic, LayoutError, LightOnOcr
from tests.fixtures.common import PROMPTS, images


@pytest.fixture(scope="module")
def vlm(loaded):
    return loaded("lighton_ocr")


def test_adapter(vlm):
    tok = vlm.family.tokenizer
    assert type(vlm.family) is LightOnOcr and vlm.family.name == "lighton_ocr"
    assert vlm.family.content_ids == {tok.convert_tokens_to_ids("<|image_pad|>")}
    assert vlm.family.boi_id is None and vlm.family.eoi_id is None and not vlm.family.eol_ids
    assert "No end-of-image token" in vlm.family.eoi_doc


@pytest.mark.parametrize("image_first", [True, False])
def test_roles_match_token_ids(vlm, image_first):
    batch = vlm.prepare(images(2), PROMPTS, image_first=image_first)
    ids = batch.input_ids
    tok = vlm.family.tokenizer
    image_id = vlm.processor.image_token_id
    assert ids.shape[0] == 2 and batch.first[0] != batch.first[1]  # different prompt lengths, left padded
    for b in range(2):
        img = batch.positions("image")[b]
        assert torch.equal(img, torch.nonzero(ids[b] == image_id).flatten())
        assert img.numel() == 16 and img.tolist() == list(range(int(img[0]), int(img[-1]) + 1))
        assert torch.equal(batch.positions("image_content")[b], img)
        assert batch.positions("eol")[b].numel() == 0 and batch.positions("boi")[b].numel() == 0
        eoi = int(batch.index("eoi")[b])
        assert eoi == int(img[-1]) + 1
        assert tok.convert_ids_to_tokens(int(ids[b, eoi])) == ("Ċ" if image_first else "<|im_end|>")
        assert batch.positions("text")[b].tolist() == list(range(eoi + 1, ids.shape[1]))
        for name in ("image_break_token", "image_end_token"):  # named by the tokenizer, written by no prompt
            assert getattr(vlm.processor, f"{name}_id") not in ids[b].tolist()
    assert batch.index("last").tolist() == [ids.shape[1] - 1] * 2


def test_the_generic_adapter_would_expect_the_unwritten_end_token(vlm):
    generic = Generic(vlm.processor, vlm.model.config)
    assert generic.eoi_id == vlm.processor.image_end_token_id
    inputs = vlm.family.encode(images(1), [vlm.family.prompt(PROMPTS[0])])
    row = inputs["input_ids"][0].tolist()
    with pytest.raises(LayoutError, match="not the end-of-image id"):
        generic.check_layout(row, generic.layout(row, 0))
