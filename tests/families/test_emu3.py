"""Emu3: load the tiny checkpoint, check every role against the token ids, run forward and generate."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.common import PROMPTS, images


@pytest.fixture(scope="module")
def vlm(loaded):
    return loaded("emu3")


def _ids(vlm, token):
    return vlm.family.tokenizer.convert_tokens_to_ids(token)


def test_prompt_matches_the_chat_template_when_image_first(vlm):
    """Image first, the hand-written prompt is exactly what the Emu3-Chat-hf template renders."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}]
    rendered = vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert vlm.family.prompt(PROMPTS[0], image_first=True) == rendered
    assert vlm.family.prompt("Hi?", image_first=False) == "USER: Hi? <image>ASSISTANT:"


@pytest.mark.parametrize("image_first", [True, False])
def test_roles_match_token_ids(vlm, image_first):
    batch = vlm.prepare(images(2), PROMPTS, image_first=image_first)
    ids = batch.input_ids
    tok = vlm.family.tokenizer
    image_id = vlm.processor.image_token_id
    boi_id, eoi_id = _ids(vlm, "<|image start|>"), _ids(vlm, "<|image end|>")
    wrapper_id, eof_id = _ids(vlm, "<|image token|>"), _ids(vlm, "<|extra_201|>")
    assert vlm.family.boi_id == boi_id and vlm.family.eoi_id == eoi_id
    # 40x40 images, downsampling 8: a 5x5 code grid, 5 * (5 + 1) placeholders.
    h = w = int(batch.inputs["image_sizes"][0, 0]) // 8
    assert ids.shape[0] == 2 and batch.first[0] != batch.first[1]  # different prompt lengths, left padded
    for b in range(2):
        row = ids[b]
        boi = int(batch.index("boi")[b])
        assert int(row[boi]) == boi_id and int((row == boi_id).sum()) == 1
        eoi = int(batch.index("eoi")[b])
        assert int(row[eoi]) == eoi_id and int(row[eoi - 1]) == eof_id
        # image: everything strictly between <|image start|> and <|image end|>
        img = batch.positions("image")[b]
        assert img.tolist() == list(range(boi + 1, eoi))
        assert tok.decode(row[boi + 1 : int(torch.nonzero(row == wrapper_id)[0])]) == f"{h}*{w}"
        pads = torch.nonzero(row == image_id).flatten()
        assert pads.numel() == h * (w + 1) and set(pads.tolist()) <= set(img.tolist())
        # eol: the last placeholder of every row of w + 1; content: the others
        eol = batch.positions("eol")[b]
        assert eol.tolist() == [int(pads[0]) + r * (w + 1) + w for r in range(h)]
        content = batch.positions("image_content")[b]
        assert content.numel() == h * w
        assert sorted(content.tolist() + eol.tolist()) == pads.tolist()
        # in-image specials are in the span but neither content nor eol
        specials = set(img.tolist()) - set(pads.tolist())
        assert {int(row[p]) for p in specials} >= {wrapper_id, eof_id} and len(specials) == 2 + 3  # "5", "*", "5"
        assert int(batch.index("first_image")[b]) == int(pads[0])
        assert int(batch.index("last_image")[b]) == int(pads[-2])  # pads[-1] is the last row's eol
        assert int(batch.index("image[3]")[b]) == int(content[3])
        assert int(batch.index(f"image[{w}]")[b]) == int(pads[w + 1])  # first code of the second row
        text = batch.positions("text")[b]
        assert text.tolist() == list(range(eoi + 1, ids.shape[1]))
        bos = int(batch.index("bos")[b])
        assert bos == batch.first[b] and int(row[bos]) == tok.bos_token_id
        assert int((row == tok.bos_token_id).sum()) == 1  # the processor writes the one BOS
    assert batch.index("last").tolist() == [ids.shape[1] - 1] * 2


def test_eol_positions_are_where_the_model_puts_its_line_breaks(vlm):
    """Images of different, non-square sizes: per row, the layout's eol positions are exactly where the
    model's VQ -> BPE conversion writes <|extra_200|>, and its content positions hold visual tokens."""
    from PIL import Image

    wide = Image.new("RGB", (48, 32), (200, 30, 30))  # 32 high, 48 wide: a 4 x 6 code grid
    batch = vlm.prepare([images(1)[0], wide], PROMPTS)
    sizes = batch.inputs["image_sizes"].tolist()
    assert sizes == [[40, 40], [32, 48]]
    with torch.no_grad():
        bpe = vlm.model.model.get_image_tokens(batch.inputs["pixel_values"], batch.inputs["image_sizes"])
    eol_id = _ids(vlm, "<|extra_200|>")
    visual = set(vlm.model.vocabulary_mapping.image_tokens)
    offset = 0
    for b, (hh, ww) in enumerate(sizes):
        h, w = hh // 8, ww // 8
        row_tokens = bpe[offset : offset + h * (w + 1)]
        offset += h * (w + 1)
        pads = torch.nonzero(batch.input_ids[b] == vlm.processor.image_token_id).flatten()
        eol, content = batch.positions("eol")[b], batch.positions("image_content")[b]
        assert eol.numel() == h and content.numel() == h * w
        at = {int(p): int(t) for p, t in zip(pads, row_tokens)}
        assert all(at[int(p)] == eol_id for p in eol)
        assert all(at[int(p)] in visual for p in content)
    assert offset == bpe.numel()
