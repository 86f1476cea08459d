"""LLaVA-OneVision: load the tiny checkpoint, check every role against the token ids, run forward and generate.

The checks it shares with LLaVA-NeXT are in `tests.families.anyres_checks`.
"""

from __future__ import annotations

import pytest

from narrowgate.families import LlavaOneVision
from tests.families import anyres_checks as anyres
from tests.families.anyres_checks import SIZES


@pytest.fixture(scope="module")
def vlm(loaded):
    return loaded("llava_onevision")


def test_family_and_ids(vlm):
    fam = vlm.family
    assert isinstance(fam, LlavaOneVision)
    assert fam.tokenizer.bos_token_id is None
    anyres.check_ids_and_grids(vlm)


@pytest.mark.parametrize("image_first", [True, False])
@pytest.mark.parametrize("sizes", SIZES)
def test_roles_match_token_ids(vlm, image_first, sizes):
    batch = anyres.check_roles(vlm, image_first, sizes)
    ids, tok = batch.input_ids, vlm.family.tokenizer
    for b in range(2):
        eoi = int(batch.index("eoi")[b])
        assert tok.decode([int(ids[b, eoi])]) == ("\n" if image_first else "<|im_end|>")
        assert batch.positions("bos")[b].numel() == 0  # Qwen2: no BOS token
        assert int(ids[b, batch.first[b]]) == tok.convert_tokens_to_ids("<|im_start|>")


def test_identical_rows(vlm):
    anyres.check_identical_rows(vlm)


def test_layout_from_the_processor_output(vlm):
    anyres.check_layout_from_the_processor_output(vlm)


def test_newline_features_are_the_models(vlm):
    """The eol positions hold the model's image_newline embedding (after projection), nothing else does."""
    anyres.newline_features(vlm, "batch_num_images")


def test_raw_prompt_without_chat_template(vlm):
    anyres.check_raw_prompt(vlm, "<|im_start|>user <image><image>")


def test_square_test_images(vlm):
    anyres.check_square_test_images(vlm)
