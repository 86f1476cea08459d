"""LLaVA-1.5: load the tiny checkpoint, check every role against the token ids, run forward and generate."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.common import PROMPTS, images


@pytest.fixture(scope="module")
def vlm(loaded):
    return loaded("llava")


@pytest.mark.parametrize("image_first", [True, False])
def test_roles_match_token_ids(vlm, image_first):
    batch = vlm.prepare(images(2), PROMPTS, image_first=image_first)
    ids = batch.input_ids
    image_id = vlm.processor.image_token_id
    assert ids.shape[0] == 2 and batch.first[0] != batch.first[1]  # different prompt lengths, left padded
    for b in range(2):
        img = batch.positions("image")[b]
        assert torch.equal(img, torch.nonzero(ids[b] == image_id).flatten())
        assert torch.equal(batch.positions("image_content")[b], img)
        assert batch.positions("eol")[b].numel() == 0 and batch.positions("boi")[b].numel() == 0
        eoi = int(batch.index("eoi")[b])
        assert eoi == int(img[-1]) + 1 and int(ids[b, eoi]) != image_id
        assert int(batch.index("first_image")[b]) == int(img[0])
        assert int(batch.index("last_image")[b]) == int(img[-1])
        assert int(batch.index("image[3]")[b]) == int(img[3])
        text = batch.positions("text")[b]
        assert text.tolist() == list(range(eoi + 1, ids.shape[1]))
        assert int(ids[b, batch.index("bos")[b]]) == vlm.family.tokenizer.bos_token_id
    assert batch.index("last").tolist() == [ids.shape[1] - 1] * 2
