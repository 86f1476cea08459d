"""Real image sizes through the real processors: a 1,344 x 1,344 image prepared by each dynamic-resolution family's
stock processor set to its real checkpoint's sizes (tiny widths, real token counts: 2,304 to 7,371 image tokens),
then the roles, knockouts and the exact gate scan on it."""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch

import narrowgate as ng
from narrowgate.analyses.gate_scan import side_positions, sources
from narrowgate.engine.shared import Condition
from narrowgate.metrics.scores import kl
from tests.fixtures.common import sized_images

SIDE = 1344
PROMPT = "What color is the shape?"
#: Image tokens (the placeholders the model fills with image features) of a 1,344 x 1,344 image, by the real rules:
EXPECTED = {
    "qwen2_vl": (SIDE // 28) ** 2,  # 14-pixel patches merged 2 x 2: 48 x 48
    "pixtral": (1024 // 16) ** 2,  # fit into 1,024 pixels, 16-pixel patches: 64 x 64 (plus 63 row breaks)
    "idefics3": (4 * 4 + 1) * (364 // 14) ** 2 // 4,  # 1,456 pixels = 4 x 4 tiles + the global image, 169 each
    # 384-pixel crops of 27 x 27 features: the base crop, and the 4 x 4-crop grid (1,536 pixels) of 108 x 108
    # features downscaled to at most 9 crops' worth (81 x 81), one newline feature per row
    "llava_onevision": 27 * 27 + 81 * (81 + 1),
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def large(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(f"real-sizes-{family}")
    importlib.import_module(f"tests.fixtures.{family}").build(path, real_sizes=True)
    vlm = ng.load(path)
    batch = vlm.prepare(sized_images((SIDE, SIDE), seed=7), [PROMPT])
    return family, vlm, batch


def test_roles_cover_every_image_token_at_its_real_count(large):
    family, vlm, batch = large
    ids, lay = batch.input_ids[0], batch.layouts[0]
    placeholders = torch.isin(ids, torch.tensor(sorted(vlm.family.content_ids))).nonzero().flatten()
    assert len(placeholders) == EXPECTED[family]
    image, eol = batch.positions("image")[0], batch.positions("eol")[0]
    assert set(placeholders.tolist()) <= set(image.tolist()) and int(image[-1]) == lay.end  # the span covers them
    content = placeholders
    if family == "llava_onevision":  # the newline features are placeholders too, in role eol
        assert len(eol) == 81 and set(eol.tolist()) <= set(placeholders.tolist())
        content = placeholders[~torch.isin(placeholders, eol)]
    if family == "pixtral":
        assert len(eol) == 1024 // 16 - 1  # a break closes every row but the last
    assert torch.equal(batch.positions("image_content")[0], content)
    assert lay.eoi == lay.end + 1 and int(batch.index("last")[0]) == batch.length - 1
    assert batch.positions("text")[0].tolist() == list(range(lay.eoi + 1, batch.length))


def test_knockouts_on_the_shared_prefix_equal_whole_sequence_forwards(large):
    """Both engine paths at thousands of positions: suffix passes over the shared image prefix, and whole-sequence
    attention in blocks of query rows (both sized by the memory budget); and the knockouts change the output."""
    _, vlm, batch = large
    conds = [
        Condition("baseline"),
        Condition("eoi->text", knockouts=(ng.Knockout("eoi", "text"),)),
        Condition("image->eoi+text", knockouts=(ng.Knockout("image", ("eoi", "text"), mode="mask"),)),
    ]
    shared = vlm.forward_conditions(batch, conds)
    for c in conds:
        full = vlm.forward(batch, knockouts=c.knockouts).logits[:, -1].float()
        torch.testing.assert_close(shared[c.name].last_logits, full, atol=1e-5, rtol=0)
    base = shared["baseline"].last_logits
    assert all((shared[c.name].last_logits - base).abs().max() > 1e-6 for c in conds[1:])


def test_gate_scan_over_every_position_equals_single_knockout_forwards(large, monkeypatch):
    """The exact scan over every image-side position (sparse sources, KL reduced pass by pass), checked at three
    positions against separate whole-sequence forwards."""
    _, vlm, batch = large
    lay = batch.layouts[0]
    side = side_positions(lay)
    # At tiny widths a plain forward needs so little that the default budget makes hundreds of passes; results do
    # not depend on the split (tests/engine/test_budget.py), so the scan takes a realistic budget here.
    monkeypatch.setattr(vlm, "budget", replace(vlm.budget, limit=256 << 20))
    prefix = vlm.share_prefix(batch, lay.eoi + 1)
    base = vlm.forward_knockouts(prefix, sources([[]], batch.length), mode="mask")[0, 0]
    damage = vlm.forward_knockouts(
        prefix, sources([[p] for p, _, _ in side], batch.length), mode="mask", reduce=lambda x: kl(base, x[:, 0])
    )
    assert damage.shape == (len(side),) and torch.isfinite(damage).all() and (damage >= 0).all()
    names = [n for _, n, _ in side]
    n = EXPECTED[large[0]]
    for name in ("image[0]", f"image[{n // 2}]", "eoi"):
        full = vlm.forward(batch, knockouts=[ng.Knockout(name, "text", mode="mask")]).logits[0, -1].float()
        torch.testing.assert_close(damage[names.index(name)], kl(base, full[None])[0], atol=1e-5, rtol=0)
