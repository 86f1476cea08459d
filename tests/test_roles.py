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


@pytest.mark.parametrize(
    "text", ["eoi@1", "eoi@-1", "image@2", "image@2[3]", "boi@10", "between@1[0]", "frame@3", "frame@-1[2]", "eol@2[1]"]
)
def test_per_image_and_frame_roles_round_trip(text):
    role = parse_role(text)
    assert role.at is not None and str(role) == text and parse_role(str(role)) == role


@pytest.mark.parametrize(
    "text", ["eoi@0", "eoi@01", "text@1", "last@2", "bos@1", "frame", "frame[2]", "image@1[01]", "eoi@1[0]", "eoi@"]
)
def test_numbers_where_roles_take_none_are_refused(text):
    with pytest.raises(RoleError, match="eoi@n"):
        parse_role(text)


def _two_image_batch():
    """Two examples, hand-laid: [bos] boi img img eoi x x boi img img eoi text text text (the second left-padded
    by one, its second image with a frame-less span of three tokens)."""
    from narrowgate.batch import Batch
    from narrowgate.families.base import ImageLayout

    ids = torch.arange(15).repeat(2, 1)
    row0 = [
        ImageLayout(start=2, end=3, content=[2, 3], boi=1, eoi=4),
        ImageLayout(start=8, end=9, content=[8, 9], boi=7, eoi=10),
    ]
    row1 = [
        ImageLayout(start=3, end=4, content=[3, 4], boi=2, eoi=5),
        ImageLayout(start=8, end=10, content=[8, 10], eol=[9], boi=7, eoi=11),
    ]
    return Batch(inputs={"input_ids": ids}, layouts=[row0, row1], first=[0, 1], bos_id=0)


def test_roles_of_several_images_are_each_images_and_their_union():
    batch = _two_image_batch()
    pos = lambda role: [p.tolist() for p in batch.positions(role)]  # noqa: E731
    assert pos("eoi@1") == [[4], [5]] and pos("eoi@2") == [[10], [11]] and pos("eoi@-1") == pos("eoi@2")
    assert pos("eoi") == [[4, 10], [5, 11]] and pos("boi") == [[1, 7], [2, 7]]
    assert pos("image@2") == [[8, 9], [8, 9, 10]] and pos("image") == [[2, 3, 8, 9], [3, 4, 8, 9, 10]]
    assert pos("image[0]") == [[2, 8], [3, 8]] and pos("image@2[-1]") == [[9], [10]] and pos("eol@2") == [[], [9]]
    assert pos("between") == [[5, 6], [6]] and pos("between@1[1]") == [[6], []] and pos("between@2") == [[], []]
    assert pos("text") == [[11, 12, 13, 14], [12, 13, 14]] and pos("last") == [[14], [14]]
    assert pos("eoi@3") == [[], []] and pos("bos") == [[0], []]
    assert batch.index("eoi@2").tolist() == [10, 11] and batch.end_of_images == 11
    for role in ("eoi", "image[0]", "first_image", "boi"):
        with pytest.raises(RoleError, match=r"names 2 positions in example 0, one per image of its 2; name the image"):
            batch.index(role)
    assert batch.ambiguous("image") is None and batch.ambiguous("eoi@1") is None and batch.ambiguous("last") is None
    with pytest.raises(RoleError, match="eoi@3 is empty in every example of this batch .its prompts hold fewer"):
        batch.mask("eoi@3")


def test_frames_of_a_video_are_roles():
    from narrowgate.batch import Batch
    from narrowgate.families.base import ImageLayout

    video = ImageLayout(
        start=2, end=8, content=[2, 3, 4, 5, 6, 7], eol=[8], boi=1, eoi=9, frames=[[2, 3], [4, 5], [6, 7]]
    )
    batch = Batch(inputs={"input_ids": torch.zeros(1, 12, dtype=torch.long)}, layouts=[video], first=[0])
    pos = lambda role: batch.positions(role)[0].tolist()  # noqa: E731
    assert pos("frame@1") == [2, 3] and pos("frame@-1") == [6, 7] and pos("frame@2[1]") == [5] and pos("frame@4") == []
    assert pos("image") == list(range(2, 9)) and pos("eoi") == [9] and pos("text") == [10, 11]
    assert [name for _, name, _ in image_side(video)] == [
        "frame@1[0]",
        "frame@1[1]",
        "frame@2[0]",
        "frame@2[1]",
        "frame@3[0]",
        "frame@3[1]",
        "eol[0]",
        "eoi",
    ]
    assert [name for _, name, _ in image_side(video, 2)][:2] == ["image@2[0]", "image@2[1]"]
