"""Pixtral: load the tiny checkpoint, check every role against the token ids, run forward and generate."""

from __future__ import annotations

import pytest
import torch

from narrowgate.families import LayoutError, Llava, Pixtral, family_for
from tests.families.checks import contains
from tests.fixtures.common import PROMPTS, images


@pytest.fixture(scope="module")
def vlm(loaded):
    return loaded("pixtral")


def test_registry_tells_pixtral_from_llava(monkeypatch):
    """Each adapter's accepts() decides alone: the answer does not depend on the registry's order."""
    import narrowgate.families as families

    for order in (families.FAMILIES, tuple(reversed(families.FAMILIES))):
        monkeypatch.setattr(families, "FAMILIES", order)
        assert family_for("llava", "pixtral") is Pixtral
        assert family_for("llava", "clip_vision_model") is Llava


def test_family_and_ids(vlm):
    fam, tok = vlm.family, vlm.family.tokenizer
    assert isinstance(fam, Pixtral)
    assert fam.content_ids == {tok.convert_tokens_to_ids("[IMG]")}
    assert fam.eol_ids == fam.special_ids == {tok.convert_tokens_to_ids("[IMG_BREAK]")}
    assert fam.eoi_id == tok.convert_tokens_to_ids("[IMG_END]") and fam.boi_id is None


@pytest.mark.parametrize("image_first", [True, False])
def test_roles_match_token_ids(vlm, image_first):
    batch = vlm.prepare(images(2), PROMPTS, image_first=image_first)
    ids = batch.input_ids
    tok = vlm.family.tokenizer
    img_id, brk_id, end_id = (tok.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]"))
    assert ids.shape[0] == 2 and batch.first[0] != batch.first[1]  # different prompt lengths, left padded
    for b in range(2):
        row = ids[b]
        content = torch.nonzero(row == img_id).flatten()
        breaks = torch.nonzero(row == brk_id).flatten()
        end = torch.nonzero(row == end_id).flatten()
        assert end.numel() == 1
        # The processor's image span: [IMG] and [IMG_BREAK] tokens up to [IMG_END]; 40x40 -> 4 rows of 4.
        img = batch.positions("image")[b]
        assert img.tolist() == list(range(int(content[0]), int(end[0])))
        assert len(content) == 16 and len(breaks) == 3
        assert torch.equal(batch.positions("image_content")[b], content)
        assert torch.equal(batch.positions("eol")[b], breaks)
        assert [int(p) - int(img[0]) for p in breaks] == [4, 9, 14]  # one break after each row but the last
        assert int(batch.index("eoi")[b]) == int(end[0]) == int(img[-1]) + 1
        assert batch.positions("boi")[b].numel() == 0
        assert int(batch.index("first_image")[b]) == int(content[0])
        assert int(batch.index("last_image")[b]) == int(content[-1]) == int(end[0]) - 1
        assert int(batch.index("image[5]")[b]) == int(content[5])
        assert int(batch.index("image[-1]")[b]) == int(content[-1])
        assert torch.equal(batch.positions("internal_image")[b], content[1:-1])
        eoi = int(end[0])
        text = batch.positions("text")[b]
        assert text.tolist() == list(range(eoi + 1, ids.shape[1]))
        assert int(ids[b, batch.index("bos")[b]]) == tok.bos_token_id
        assert int(batch.index("bos")[b]) == batch.first[b] and int((row == tok.bos_token_id).sum()) == 1
        prompt_ids = tok(PROMPTS[b], add_special_tokens=False)["input_ids"]
        where = range(batch.first[b], int(img[0])) if not image_first else range(eoi + 1, ids.shape[1])
        assert contains(row[list(where)].tolist(), prompt_ids)
    assert batch.index("last").tolist() == [ids.shape[1] - 1] * 2


def test_image_size_sets_the_grid(vlm):
    """A non-square image gives a different number of rows and columns."""
    from PIL import Image

    wide = Image.new("RGB", (40, 20), (200, 30, 30))  # width 40, height 20 -> 2 rows of 4 patches
    batch = vlm.prepare([wide, images(1)[0]], PROMPTS)
    lay = batch.layouts[0]
    assert len(lay.content) == 8 and [p - lay.start for p in lay.eol] == [4]
    assert len(batch.layouts[1].content) == 16


def test_malformed_image_span_raises(vlm):
    fam, tok = vlm.family, vlm.family.tokenizer
    img, brk, end, bos = (tok.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]", "<s>"))
    good = [bos, img, img, brk, img, img, end]
    fam.check_layout(good, fam.layout(good, 0))
    ragged = [bos, img, img, brk, img, end]
    with pytest.raises(LayoutError, match="same width"):
        fam.check_layout(ragged, fam.layout(ragged, 0))
    unclosed = [bos, img, img, brk, img, img]
    with pytest.raises(LayoutError, match="IMG_END"):
        fam.check_layout(unclosed, fam.layout(unclosed, 0))


def test_raw_prompt_without_chat_template(vlm):
    template, vlm.processor.chat_template = vlm.processor.chat_template, None
    try:
        batch = vlm.prepare(images(2), PROMPTS, image_first=False)
    finally:
        vlm.processor.chat_template = template
    tok = vlm.family.tokenizer
    row = batch.input_ids[0, batch.first[0] :].tolist()
    assert tok.convert_ids_to_tokens(row[:2]) == ["<s>", "[INST]"] and row.count(tok.bos_token_id) == 1
    assert tok.convert_ids_to_tokens(row[-1]) == "[/INST]"
    assert int(batch.index("eoi")[0]) == batch.length - 2  # [IMG_END] right before [/INST]
