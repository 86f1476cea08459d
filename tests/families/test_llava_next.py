"""LLaVA-NeXT: load the tiny checkpoint, check every role against the token ids, run forward and generate."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from narrowgate.families import LayoutError, LlavaNext, LlavaOneVision
from tests.fixtures.common import PROMPTS, images

# (height, width) -> (rows, columns) of the high-resolution feature grid in the tiny checkpoint
# (16 base features; 40x30 is unpadded from 8 to 6 rows, 60x20 from 4 to 2 columns).
GRIDS = {(40, 40): (4, 4), (20, 40): (4, 8), (40, 30): (6, 4), (60, 20): (8, 2)}
BASE = 16


def sized_images(*sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def vlm(loaded):
    return loaded("llava_next")


def test_family_and_ids(vlm):
    fam = vlm.family
    assert isinstance(fam, LlavaNext) and not isinstance(fam, LlavaOneVision)
    assert fam.content_ids == {vlm.processor.image_token_id}
    assert fam.eoi_id is None and fam.boi_id is None and not fam.special_ids
    assert fam.base_features == BASE
    for size, grid in GRIDS.items():
        assert fam.feature_grid(*size) == grid


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
@pytest.mark.parametrize("sizes", [((40, 40), (20, 40)), ((40, 30), (60, 20))])
def test_roles_match_token_ids(vlm, image_first, sizes):
    batch = vlm.prepare(sized_images(*sizes), PROMPTS, image_first=image_first)
    ids = batch.input_ids
    image_id = vlm.processor.image_token_id
    tok = vlm.family.tokenizer
    assert ids.shape[0] == 2 and batch.first[0] != batch.first[1]  # different prompt lengths, left padded
    spans = []
    for b in range(2):
        rows, cols = GRIDS[sizes[b]]
        img = batch.positions("image")[b]
        # The processor's image span: every <image> token, contiguous.
        assert torch.equal(img, torch.nonzero(ids[b] == image_id).flatten())
        assert img.tolist() == list(range(int(img[0]), int(img[-1]) + 1))
        assert len(img) == BASE + rows * (cols + 1)
        spans.append(len(img))
        # One newline feature closes each grid row; the base features come first.
        eol = batch.positions("eol")[b]
        start = int(img[0])
        assert [int(p) - start for p in eol] == [BASE + (r + 1) * (cols + 1) - 1 for r in range(rows)]
        assert int(eol[-1]) == int(img[-1])
        content = batch.positions("image_content")[b]
        assert len(content) == BASE + rows * cols
        assert sorted(content.tolist() + eol.tolist()) == img.tolist()
        assert batch.positions("boi")[b].numel() == 0
        assert int(batch.index("first_image")[b]) == start
        assert int(batch.index("last_image")[b]) == int(img[-1]) - 1  # the last grid feature, before its newline
        assert int(batch.index(f"image[{BASE}]")[b]) == start + BASE  # first grid feature
        assert int(batch.index(f"image[{BASE + cols}]")[b]) == start + BASE + cols + 1  # second row skips a newline
        assert torch.equal(batch.positions("internal_image")[b], content[1:-1])
        eoi = int(batch.index("eoi")[b])
        assert eoi == int(img[-1]) + 1 and int(ids[b, eoi]) != image_id
        # Image first: the newline after <image>; text first: the space before [/INST].
        assert tok.decode([int(ids[b, eoi])]) == ("\n" if image_first else " ")
        assert tok.decode(ids[b, eoi + 1 :]).endswith("[/INST]")
        text = batch.positions("text")[b]
        assert text.tolist() == list(range(eoi + 1, ids.shape[1]))
        assert batch.index("bos")[b] == batch.first[b] and int(ids[b, batch.first[b]]) == tok.bos_token_id
        assert int(ids[b, batch.first[b] + 1]) == tok.convert_tokens_to_ids("[INST]")
        prompt_ids = tok(PROMPTS[b], add_special_tokens=False)["input_ids"]
        where = range(batch.first[b], start) if not image_first else range(eoi + 1, ids.shape[1])
        assert _contains(ids[b, list(where)].tolist(), prompt_ids)
    assert spans[0] != spans[1]
    assert batch.index("last").tolist() == [ids.shape[1] - 1] * 2


def _contains(seq, sub):
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_identical_rows(vlm):
    """Two rows with the same ids (same prompt, same image size) both get their layout."""
    batch = vlm.prepare(sized_images((40, 40), (40, 40)), [PROMPTS[0]] * 2)
    assert torch.equal(batch.input_ids[0], batch.input_ids[1])
    assert torch.equal(batch.positions("eol")[0], batch.positions("eol")[1])


def test_layout_needs_the_encoded_batch(vlm):
    batch = vlm.prepare(sized_images((40, 40)), PROMPTS[:1])
    row = batch.input_ids[0].tolist()
    with pytest.raises(LayoutError, match="LLaVA-NeXT.*VLM.prepare"):
        vlm.family.layout([row[0]] + row, 0)


def test_newline_features_are_the_models(vlm):
    """The eol positions hold the model's image_newline embedding, nothing else does; the span holds every feature."""
    batch = vlm.prepare(sized_images((40, 30), (20, 40)), PROMPTS)
    inputs = vlm._inputs(batch)
    with torch.no_grad():
        feats = vlm.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=vlm.model.config.vision_feature_layer,
            vision_feature_select_strategy=vlm.model.config.vision_feature_select_strategy,
        ).pooler_output
    newline = vlm.model.model.image_newline
    for b, f in enumerate(feats):
        lay = batch.layouts[b]
        assert f.shape[0] == lay.end - lay.start + 1
        is_newline = (f == newline).all(-1)
        assert torch.nonzero(is_newline).flatten().tolist() == [p - lay.start for p in lay.eol]


def test_raw_prompt_without_chat_template(vlm):
    template, vlm.processor.chat_template = vlm.processor.chat_template, None
    try:
        batch = vlm.prepare(sized_images((40, 40), (20, 40)), PROMPTS)
    finally:
        vlm.processor.chat_template = template
    tok = vlm.family.tokenizer
    for b in range(2):
        row = batch.input_ids[b]
        assert tok.decode(row[batch.first[b] :]).startswith("<s>[INST] <image><image>")
        assert tok.decode([int(row[batch.index("eoi")[b]])]) == "\n"
        assert len(batch.positions("eol")[b]) == GRIDS[[(40, 40), (20, 40)][b]][0]


def test_forward_and_generate(vlm):
    batch = vlm.prepare(sized_images((40, 40), (20, 40)), PROMPTS)
    out = vlm.forward(batch)
    assert out.logits.shape[:2] == batch.input_ids.shape and torch.isfinite(out.logits).all()
    gen = vlm.generate(batch, max_new_tokens=4)
    assert gen.shape == (2, batch.length + 4)
    assert torch.equal(gen[:, : batch.length], batch.input_ids)


def test_square_test_images(vlm):
    """The shared square test images (used by the engine tests) lay out too."""
    batch = vlm.prepare(images(2), PROMPTS)
    assert [len(lay.eol) for lay in batch.layouts] == [4, 4]
