"""Ovis2: load the tiny checkpoint and check every role against the token ids, for an image in one tile and for one
cut into crops (the indicator tokens between crops are in-image specials)."""

from __future__ import annotations

import pytest
import torch

import narrowgate as ng
from narrowgate.families import Ovis2
from tests.fixtures import ovis2
from tests.fixtures.common import PROMPTS, images, sized_images


@pytest.fixture(scope="module")
def vlm(loaded):
    return loaded("ovis2")


@pytest.fixture(scope="module")
def cropping(tmp_path_factory):
    return ng.load(ovis2.build(tmp_path_factory.mktemp("ovis2-crops"), crop_to_patches=True), dtype="float32")


def ids(vlm, *tokens):
    return [vlm.family.tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_adapter(vlm):
    atom, start, end = ids(vlm, "<IMG_ATOM>", "<IMG_START>", "<IMG_END>")
    assert type(vlm.family) is Ovis2 and vlm.family.name == "ovis2"
    assert vlm.family.content_ids == {atom} and vlm.model.config.image_token_id == atom
    assert (vlm.family.boi_id, vlm.family.eoi_id) == (start, end) and not vlm.family.eol_ids
    assert "<IMG_END>" in vlm.family.eoi_doc


def check_roles(vlm, batch, n_atoms):
    atom, start, end = ids(vlm, "<IMG_ATOM>", "<IMG_START>", "<IMG_END>")
    indicators = set(ids(vlm, "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>"))
    input_ids = batch.input_ids
    for b in range(batch.size):
        row = input_ids[b]
        boi, eoi = int(batch.index("boi")[b]), int(batch.index("eoi")[b])
        assert (int(row[boi]), int(row[eoi])) == (start, end)
        span = batch.positions("image")[b]
        assert span.tolist() == list(range(boi + 1, eoi))
        content = batch.positions("image_content")[b]
        assert torch.equal(content, torch.nonzero(row == atom).flatten()) and content.numel() == n_atoms[b]
        assert {int(row[p]) for p in span if int(row[p]) != atom} <= indicators  # grid, column, row indicators
        if n_atoms[b] == ovis2.IMAGE_SEQ_LENGTH:  # one tile: <IMG_GRID> closes its atoms
            assert int(row[eoi - 1]) == ids(vlm, "<IMG_GRID>")[0]
        assert batch.positions("text")[b].tolist() == list(range(eoi + 1, input_ids.shape[1]))


@pytest.mark.parametrize("image_first", [True, False])
def test_roles_in_one_tile(vlm, image_first):
    batch = vlm.prepare(images(2), PROMPTS, image_first=image_first)
    assert batch.first[0] != batch.first[1]  # different prompt lengths, left padded
    check_roles(vlm, batch, [ovis2.IMAGE_SEQ_LENGTH] * 2)
    assert batch.index("last").tolist() == [batch.length - 1] * 2


def test_roles_of_an_image_cut_into_crops(cropping):
    batch = cropping.prepare(sized_images((32, 80), (40, 40)), PROMPTS)
    atoms = [int((batch.input_ids[b] == cropping.model.config.image_token_id).sum()) for b in range(2)]
    assert atoms[0] > ovis2.IMAGE_SEQ_LENGTH and atoms[0] % ovis2.IMAGE_SEQ_LENGTH == 0  # whole image + crops
    check_roles(cropping, batch, atoms)
    blind = cropping.forward(batch, knockouts=[ng.Knockout("image", ("eoi", "text"), mode="mask")]).logits
    plain = cropping.forward(batch).logits
    assert torch.isfinite(blind).all() and not torch.allclose(blind, plain)
