"""LLaVA-NeXT: load the tiny checkpoint, check every role against the token ids, run forward and generate.

The checks it shares with LLaVA-OneVision are in `tests.families.anyres_checks`.
"""

from __future__ import annotations

import copy

import pytest

from narrowgate.families import LlavaNext, LlavaOneVision
from tests.families import anyres_checks as anyres
from tests.families.anyres_checks import BASE, SIZES
from tests.families.checks import check_forward_and_generate
from tests.fixtures.common import PROMPTS, sized_images


@pytest.fixture(scope="module")
def vlm(loaded):
    return loaded("llava_next")


def test_family_and_ids(vlm):
    fam = vlm.family
    assert isinstance(fam, LlavaNext) and not isinstance(fam, LlavaOneVision)
    assert fam.base_features == BASE
    anyres.check_ids_and_grids(vlm)


@pytest.mark.parametrize("pinpoints", [None, [[96, 96], [96, 192], [192, 96]]])
def test_feature_grid_matches_the_processor(vlm, pinpoints):
    """base + rows x (cols + 1) is the processor's token count, also for grids OneVision would downscale."""
    fam, proc = vlm.family, vlm.processor
    if pinpoints is not None:
        fam = LlavaNext(proc, copy.deepcopy(vlm.model.config))
        fam.config.image_grid_pinpoints = pinpoints
        proc = copy.deepcopy(proc)
        proc.image_processor.image_grid_pinpoints = pinpoints
    for h, w in [(40, 40), (20, 40), (40, 30), (60, 20), (17, 90), (90, 17), (33, 31), (200, 150)]:
        rows, cols = fam.feature_grid(h, w)
        assert BASE + rows * (cols + 1) == proc._get_number_of_features(h, w, 16, 16) - 1, (h, w)
    if pinpoints is not None:
        assert fam.feature_grid(200, 200) == (24, 24)  # 576 features: no "anyres_max" downscaling in LLaVA-NeXT


@pytest.mark.parametrize("image_first", [True, False])
@pytest.mark.parametrize("sizes", SIZES)
def test_roles_match_token_ids(vlm, image_first, sizes):
    batch = anyres.check_roles(vlm, image_first, sizes)
    ids, tok = batch.input_ids, vlm.family.tokenizer
    for b in range(2):
        eoi = int(batch.index("eoi")[b])
        # Image first: the newline after <image>; text first: the space before [/INST].
        assert tok.decode([int(ids[b, eoi])]) == ("\n" if image_first else " ")
        assert tok.decode(ids[b, eoi + 1 :]).endswith("[/INST]")
        assert batch.index("bos")[b] == batch.first[b] and int(ids[b, batch.first[b]]) == tok.bos_token_id
        assert int(ids[b, batch.first[b] + 1]) == tok.convert_tokens_to_ids("[INST]")


def test_identical_rows(vlm):
    anyres.check_identical_rows(vlm)


def test_layout_from_the_processor_output(vlm):
    anyres.check_layout_from_the_processor_output(vlm)


def test_newline_features_are_the_models(vlm):
    """The eol positions hold the model's image_newline embedding, nothing else does; the span holds every feature."""
    batch, feats = anyres.newline_features(vlm)
    for f, lay in zip(feats, batch.layouts):
        assert f.shape[0] == lay.end - lay.start + 1


def test_raw_prompt_without_chat_template(vlm):
    anyres.check_raw_prompt(vlm, "<s>[INST] <image><image>")


def test_forward_and_generate(vlm):
    check_forward_and_generate(vlm, vlm.prepare(sized_images((40, 40), (20, 40)), PROMPTS))


def test_square_test_images(vlm):
    anyres.check_square_test_images(vlm)
