"""Every image-side position has a single-position role name, and that name finds it again."""

from __future__ import annotations

import pytest
import torch

import narrowgate as ng
from narrowgate.roles import REST, ROLE_NAMES, Role, RoleError, image_side, parse_role
from tests.fixtures.common import images

PROMPTS = ["This shape is a", "Describe it briefly"]


@pytest.mark.parametrize("text", ["image[3]", "image[-1]", "eol[0]", "eol[-2]", "image_special[1]"])
def test_indexed_roles_round_trip(text):
    role = parse_role(text)
    assert role.single and role.index is not None and str(role) == text and parse_role(str(role)) == role


@pytest.mark.parametrize("text", ["eoi[0]", "eol[01]", "image_special[]", "text[2]", REST])
def test_other_indexed_names_are_refused(text):
    with pytest.raises(RoleError):
        parse_role(text)


@pytest.mark.parametrize("family", ["chameleon", "emu3", "pixtral", "llava_onevision"])
def test_every_image_side_name_finds_its_position(loaded, family):
    vlm = loaded(family)
    batch = vlm.prepare(images(2, seed=4), PROMPTS)
    for b, lay in enumerate(batch.layouts):
        side = image_side(lay)
        assert [p for p, _, _ in side] == list(range(lay.start, lay.end + 1)) + [lay.eoi]
        for pos, name, group in side:
            assert int(batch.positions(name)[b][0]) == pos and len(batch.positions(name)[b]) == 1
            assert group in ROLE_NAMES and pos in batch.positions(group)[b].tolist()
        groups = {g for _, _, g in side}
        span = set(range(lay.start, lay.end + 1))
        assert set(batch.positions("image_special")[b].tolist()) == span - set(lay.content) - set(lay.eol)
        assert ("eol" in groups) == bool(lay.eol)


def test_a_single_line_break_can_be_knocked_out(loaded):
    vlm = loaded("pixtral")
    batch = vlm.prepare(images(2, seed=4), PROMPTS[:1] * 2)
    assert all(len(lay.eol) > 1 for lay in batch.layouts)
    one = vlm.forward(batch, knockouts=[ng.Knockout("eol[1]", "text", mode="mask")]).logits[:, -1]
    mask = torch.zeros(1, 2, batch.length, dtype=torch.bool)
    for b, lay in enumerate(batch.layouts):
        mask[0, b, lay.eol[1]] = True
    prefix = vlm.share_prefix(batch, max(lay.eoi for lay in batch.layouts) + 1)
    torch.testing.assert_close(vlm.forward_knockouts(prefix, mask)[0], one.float(), atol=1e-5, rtol=0)
    assert Role("eol", 1) == parse_role("eol[1]")
