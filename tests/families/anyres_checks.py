"""Checks that the anyres families (LLaVA-NeXT, LLaVA-OneVision) share: their tiny checkpoints have the
same vision tower and anyres grid, so the same image sizes give the same feature grids and image spans.

Each check covers what both families do; the family test modules add their own prompt-specific checks.
"""

from __future__ import annotations

import pytest
import torch

from narrowgate.families import LayoutError
from narrowgate.families.base import Item
from tests.families.checks import contains
from tests.fixtures.common import PROMPTS, images, sized_images

# (height, width) -> (rows, columns) of the high-resolution feature grid in the tiny checkpoints
# (16 base features; 40x30 is unpadded from 8 to 6 rows, 60x20 from 4 to 2 columns).
GRIDS = {(40, 40): (4, 4), (20, 40): (4, 8), (40, 30): (6, 4), (60, 20): (8, 2)}
BASE = 16
#: Pairs of image sizes for the role checks: both rows' spans differ in length.
SIZES = [((40, 40), (20, 40)), ((40, 30), (60, 20))]


def check_ids_and_grids(vlm):
    """Only <image> tokens, no boi, eoi or special token ids; the feature grid of every size in `GRIDS`."""
    fam = vlm.family
    assert fam.content_ids == {vlm.processor.image_token_id}
    assert fam.eoi_id is None and fam.boi_id is None and not fam.special_ids
    for size, grid in GRIDS.items():
        assert fam.feature_grid(*size) == grid


def check_roles(vlm, image_first, sizes):
    """The image span, its eol and content positions, eoi, text and prompt placement of each row.

    Returns the batch, for the family's checks of the tokens around the image.
    """
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
        text = batch.positions("text")[b]
        assert text.tolist() == list(range(eoi + 1, ids.shape[1]))
        prompt_ids = tok(PROMPTS[b], add_special_tokens=False)["input_ids"]
        where = range(batch.first[b], start) if not image_first else range(eoi + 1, ids.shape[1])
        assert contains(ids[b, list(where)].tolist(), prompt_ids)
    assert spans[0] != spans[1]
    assert batch.index("last").tolist() == [ids.shape[1] - 1] * 2
    return batch


def check_identical_rows(vlm):
    """Two rows with the same ids (same prompt, same image size) both get their layout."""
    batch = vlm.prepare(sized_images((40, 40), (40, 40)), [PROMPTS[0]] * 2)
    assert torch.equal(batch.input_ids[0], batch.input_ids[1])
    assert torch.equal(batch.positions("eol")[0], batch.positions("eol")[1])


def check_layout_from_the_processor_output(vlm):
    """The rows are placed from the processor's ``image_sizes``: a row laid out again from the same output gets
    the same layout, and one whose sizes disagree with its span is refused."""
    batch = vlm.prepare(sized_images((40, 40), (20, 40)), PROMPTS)
    for b in range(2):
        again = vlm.family.layouts(batch.input_ids[b].tolist(), batch.first[b], [Item("image", b)], batch.inputs)
        assert again == [batch.layouts[b]]
    with pytest.raises(LayoutError, match="span has .* tokens"):
        vlm.family.layouts(batch.input_ids[0].tolist(), batch.first[0], [Item("image", 1)], batch.inputs)


def newline_features(vlm, *input_names):
    """The eol positions hold the model's image_newline embedding, nothing else does.

    ``input_names`` are the inputs the family's ``get_image_features`` takes besides the common ones.
    Returns the batch and each image's features.
    """
    batch = vlm.prepare(sized_images((40, 30), (20, 40)), PROMPTS)
    inputs = vlm.model_inputs(batch)
    with torch.no_grad():
        feats = vlm.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=vlm.model.config.vision_feature_layer,
            vision_feature_select_strategy=vlm.model.config.vision_feature_select_strategy,
            **{name: inputs.get(name) for name in input_names},
        ).pooler_output
    newline = vlm.model.model.image_newline
    for b, f in enumerate(feats):
        lay = batch.layouts[b]
        is_newline = (f == newline).all(-1)
        assert torch.nonzero(is_newline).flatten().tolist() == [p - lay.start for p in lay.eol]
    return batch, feats


def check_raw_prompt(vlm, start):
    """Without a chat template the raw template, starting with ``start``, keeps the layout."""
    template, vlm.processor.chat_template = vlm.processor.chat_template, None
    try:
        batch = vlm.prepare(sized_images((40, 40), (20, 40)), PROMPTS)
    finally:
        vlm.processor.chat_template = template
    tok = vlm.family.tokenizer
    for b in range(2):
        row = batch.input_ids[b]
        assert tok.decode(row[batch.first[b] :]).startswith(start)
        assert tok.decode([int(row[batch.index("eoi")[b]])]) == "\n"
        assert len(batch.positions("eol")[b]) == GRIDS[[(40, 40), (20, 40)][b]][0]


def check_square_test_images(vlm):
    """The shared square test images (used by the engine tests) lay out too."""
    batch = vlm.prepare(images(2), PROMPTS)
    assert [len(lay.eol) for lay in batch.layouts] == [4, 4]
