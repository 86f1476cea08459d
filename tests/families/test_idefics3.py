"""Idefics3 and SmolVLM: load the tiny checkpoints, check every role against the token ids, run forward and generate.

Both fixtures run every test: Idefics3's tokenizer writes ``\\n\\n`` as one token (as Llama 3's
does), SmolVLM's as two, so the blank line before the global image is its own ``eol`` there.
"""

from __future__ import annotations

import pytest
import torch

from narrowgate.families import Idefics3, LayoutError
from tests.families.checks import check_forward_and_generate, contains
from tests.fixtures.common import PROMPTS, images, sized_images
from tests.fixtures.idefics3 import IMAGE_SEQ_LEN

# (height, width) -> (rows, columns) of tiles in the tiny checkpoints (longest edge 32, 16x16 tiles).
TILES = {(40, 40): (2, 2), (20, 40): (1, 2), (40, 30): (2, 2), (60, 20): (2, 1)}
N = IMAGE_SEQ_LEN  # <image> tokens per tile and for the global image
FAKE = "<fake_token_around_image>"


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def vlm(loaded, request):
    return loaded(request.param)


def merges_blank_line(vlm) -> bool:
    return len(vlm.family.tokenizer.encode("\n\n", add_special_tokens=False)) == 1


def test_family_and_ids(vlm):
    fam, tok = vlm.family, vlm.family.tokenizer
    assert isinstance(fam, Idefics3)
    assert vlm.model.config.model_type in Idefics3.model_types
    assert fam.content_ids == {vlm.processor.image_token_id}
    fake = tok.convert_tokens_to_ids(FAKE)
    assert fam.boi_id == fam.eoi_id == fake
    assert fam.special_ids == {fake, tok.convert_tokens_to_ids("<global-img>")} | {
        tok.convert_tokens_to_ids(f"<row_{i}_col_{j}>") for i in range(1, 7) for j in range(1, 7)
    }
    newlines = {"\n", "\n\n"} if merges_blank_line(vlm) else {"\n"}
    assert {tok.decode([t]) for t in fam.eol_ids} == newlines


@pytest.mark.parametrize("image_first", [True, False])
@pytest.mark.parametrize("sizes", [((40, 40), (20, 40)), ((60, 20), (40, 30))])
def test_roles_match_token_ids(vlm, image_first, sizes):
    batch = vlm.prepare(sized_images(*sizes), PROMPTS, image_first=image_first)
    ids = batch.input_ids
    tok = vlm.family.tokenizer
    image_id = vlm.processor.image_token_id
    fake = tok.convert_tokens_to_ids(FAKE)
    assert ids.shape[0] == 2 and batch.first[0] != batch.first[1]  # different prompt lengths, left padded
    spans = []
    for b in range(2):
        rows, cols = TILES[sizes[b]]
        row = ids[b].tolist()
        fakes = [p for p in range(batch.first[b], len(row)) if row[p] == fake]
        assert len(fakes) == rows * cols + 2  # one per tile, one for the global image, the closing one
        boi, eoi = int(batch.index("boi")[b]), int(batch.index("eoi")[b])
        assert (boi, eoi) == (fakes[0], fakes[-1])
        img = batch.positions("image")[b]
        assert img.tolist() == list(range(boi + 1, eoi))
        spans.append(len(img))
        # Content: every <image> token, tiles then the global image.
        content = batch.positions("image_content")[b]
        assert torch.equal(content, torch.nonzero(ids[b] == image_id).flatten())
        assert len(content) == (rows * cols + 1) * N
        # eol: the line breaks after each tile row and before the global image.
        eol = batch.positions("eol")[b].tolist()
        assert tok.decode([row[p] for p in eol]) == "\n" * (rows + 1)
        assert len(eol) == rows + (0 if merges_blank_line(vlm) else 1)
        # The other span tokens are the inner <fake_token_around_image> tokens and the tags.
        rest = [p for p in img.tolist() if p not in set(content.tolist()) | set(eol)]
        tags = [f"<row_{r}_col_{c}>" for r in range(1, rows + 1) for c in range(1, cols + 1)] + ["<global-img>"]
        assert [tok.decode([row[p]]) for p in rest] == [x for tag in tags for x in (FAKE, tag)][1:]
        assert tok.decode([row[boi + 1]]) == "<row_1_col_1>"
        assert int(batch.index("first_image")[b]) == boi + 2
        assert int(batch.index("last_image")[b]) == eoi - 1
        assert tok.decode([row[int(batch.index(f"image[{-N}]")[b]) - 1]]) == "<global-img>"
        second_tile = "<row_1_col_2>" if cols > 1 else "<row_2_col_1>"
        assert tok.decode([row[int(batch.index(f"image[{N}]")[b]) - 1]]) == second_tile
        assert torch.equal(batch.positions("internal_image")[b], content[1:-1])
        text = batch.positions("text")[b]
        assert text.tolist() == list(range(eoi + 1, ids.shape[1]))
        assert int(batch.index("bos")[b]) == batch.first[b] and row[batch.first[b]] == tok.bos_token_id
        prompt_ids = tok(PROMPTS[b], add_special_tokens=False)["input_ids"]
        where = range(batch.first[b], boi) if not image_first else range(eoi + 1, ids.shape[1])
        assert contains([row[p] for p in where], prompt_ids)
        assert tok.decode(row[eoi + 1 :]).endswith("<end_of_utterance>\nAssistant:")
    assert spans[0] != spans[1]
    assert batch.index("last").tolist() == [ids.shape[1] - 1] * 2


def test_without_image_splitting(vlm):
    """Without splitting only the global image is written: <fake><global-img><image>*n<fake>."""
    processor = vlm.processor.image_processor
    processor.do_image_splitting = False
    try:
        batch = vlm.prepare(sized_images((40, 40), (20, 40)), PROMPTS)
    finally:
        processor.do_image_splitting = True
    tok = vlm.family.tokenizer
    for b in range(2):
        lay, row = batch.layouts[b], batch.input_ids[b].tolist()
        assert tok.decode(row[lay.boi : lay.eoi + 1]) == FAKE + "<global-img>" + "<image>" * N + FAKE
        assert lay.start == lay.boi + 1 and lay.end == lay.eoi - 1
        assert lay.content == list(range(lay.boi + 2, lay.eoi)) and lay.eol == []
    assert batch.positions("eol")[0].numel() == 0


def test_image_features_fill_the_content_positions(vlm):
    """The model computes one feature per content position: tiles + global image, image_seq_len each."""
    batch = vlm.prepare(sized_images((40, 40), (20, 40)), PROMPTS)
    inputs = vlm.model_inputs(batch)
    with torch.no_grad():
        feats = vlm.model.get_image_features(
            pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"]
        ).pooler_output
    assert [f.shape[0] for f in feats] == [len(lay.content) for lay in batch.layouts] == [5 * N, 3 * N]


def test_layout_errors(vlm):
    fam = vlm.family
    batch = vlm.prepare(sized_images((20, 40)), PROMPTS[:1])
    row, lay = batch.input_ids[0].tolist(), batch.layouts[0]
    image = row[lay.boi : lay.eoi + 1]
    with pytest.raises(LayoutError, match="one image"):  # two images
        fam.layout(row[: lay.eoi + 1] + image + row[lay.eoi + 1 :], 0)
    with pytest.raises(LayoutError, match="not enclosed"):  # the closing token is missing
        fam.layout(row[: lay.eoi] + row[lay.eoi + 1 :], 0)
    with pytest.raises(LayoutError, match="tagged"):  # tiles out of order
        swapped = list(row)
        a, b = (
            swapped.index(fam.tokenizer.convert_tokens_to_ids("<row_1_col_1>")),
            swapped.index(fam.tokenizer.convert_tokens_to_ids("<row_1_col_2>")),
        )
        swapped[a], swapped[b] = swapped[b], swapped[a]
        fam.layout(swapped, 0)
    with pytest.raises(LayoutError, match="No <image>"):
        fam.layout(row[: lay.boi], 0)


def test_raw_prompt_without_chat_template(vlm):
    template, vlm.processor.chat_template = vlm.processor.chat_template, None
    try:
        batch = vlm.prepare(sized_images((40, 40), (20, 40)), PROMPTS)
        text_first = vlm.prepare(sized_images((40, 40), (20, 40)), PROMPTS, image_first=False)
    finally:
        vlm.processor.chat_template = template
    tok = vlm.family.tokenizer
    start = "<|im_start|>" if vlm.model.config.model_type == "smolvlm" else tok.bos_token
    for b in range(2):
        row = batch.input_ids[b]
        assert tok.decode(row[batch.first[b] :]).startswith(f"{start}User:{FAKE}<row_1_col_1>")
        assert tok.decode(row[batch.index("eoi")[b] + 1 :]) == f"{PROMPTS[b]}<end_of_utterance>\nAssistant:"
        assert batch.index("bos")[b] == batch.first[b]
        row = text_first.input_ids[b]
        assert tok.decode(row[text_first.first[b] : text_first.index("boi")[b]]) == f"{start}User: {PROMPTS[b]}"
    assert [len(lay.eol) for lay in batch.layouts] == [len(lay.eol) for lay in text_first.layouts]


def test_forward_and_generate(vlm):
    check_forward_and_generate(vlm, vlm.prepare(sized_images((40, 40), (20, 40)), PROMPTS))


def test_square_test_images(vlm):
    """The shared square test images (used by the engine tests) lay out too: 2 x 2 tiles each."""
    batch = vlm.prepare(images(2), PROMPTS)
    assert [len(lay.content) for lay in batch.layouts] == [5 * N, 5 * N]
