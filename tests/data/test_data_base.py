"""Example image loading, bad-example reporting and seeded sampling."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from narrowgate.data import (
    BadExample,
    ClassExample,
    Example,
    Skipped,
    by_label,
    iter_images,
    sample,
    sample_per_class,
)
from tests.data.helpers import CORRUPT_BYTES, jpeg_bytes, write_jpeg


def test_load_image_from_path_is_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 4), 128).save(path)
    image = Example(id="a", image_path=path).load_image()
    assert image.mode == "RGB" and image.size == (5, 4)
    assert image.getpixel((2, 2)) == (128, 128, 128)


def test_load_image_from_bytes_and_render():
    assert Example(id="b", image_bytes=jpeg_bytes(size=(7, 3))).load_image().size == (7, 3)
    drawn = Example(id="r", render=lambda: Image.new("RGBA", (2, 2), (1, 2, 3, 4))).load_image()
    assert drawn.mode == "RGB" and drawn.getpixel((0, 0)) == (1, 2, 3)


def test_image_is_not_opened_before_load_image(tmp_path):
    example = Example(id="m", image_path=tmp_path / "absent.jpg")
    assert example.id == "m"
    with pytest.raises(BadExample) as info:
        example.load_image()
    assert info.value.example_id == "m"
    assert info.value.reason.startswith("missing image")


@pytest.mark.parametrize(
    "content",
    [CORRUPT_BYTES, b"", jpeg_bytes(size=(64, 64))[:200]],
    ids=["garbage", "empty", "truncated"],
)
def test_corrupt_files_raise_bad_example(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(BadExample) as info:
        Example(id="c", image_path=path).load_image()
    assert info.value.reason.startswith("corrupt image")
    assert str(path) in info.value.reason


def test_corrupt_bytes_and_no_source_raise_bad_example():
    with pytest.raises(BadExample, match="corrupt image"):
        Example(id="x", image_bytes=CORRUPT_BYTES).load_image()
    with pytest.raises(BadExample, match="no image source"):
        Example(id="y").load_image()


def test_iter_images_skips_and_records_bad_examples(tmp_path, caplog):
    good = write_jpeg(tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(CORRUPT_BYTES)
    examples = [
        Example(id="1", image_path=good),
        Example(id="2", image_path=tmp_path / "bad.jpg"),
        Example(id="3", image_path=tmp_path / "gone.jpg"),
        Example(id="4", image_path=good),
    ]
    skipped: list[Skipped] = []
    with caplog.at_level(logging.WARNING, logger="narrowgate.data"):
        loaded = list(iter_images(examples, skipped))
    assert [e.id for e, _ in loaded] == ["1", "4"]
    assert all(isinstance(image, Image.Image) for _, image in loaded)
    assert [s.id for s in skipped] == ["2", "3"]
    assert skipped[0].reason.startswith("corrupt image") and skipped[1].reason.startswith("missing image")
    assert skipped[1].as_dict() == {"id": "3", "reason": skipped[1].reason}
    assert "skipping example 2" in caplog.text
    assert [e.id for e, _ in iter_images(examples)] == ["1", "4"]


def _examples(ids):
    return [Example(id=i) for i in ids]


def test_sample_is_seeded_and_independent_of_input_order():
    ids = [f"{k:04d}" for k in range(500)]
    a = sample(_examples(ids), 50, seed=7)
    b = sample(_examples(list(reversed(ids))), 50, seed=7)
    assert [e.id for e in a] == [e.id for e in b]
    assert len({e.id for e in a}) == 50
    c = sample(_examples(ids), 50, seed=8)
    assert {e.id for e in a} != {e.id for e in c}
    assert [e.id for e in sample(_examples(ids), 50)] == [e.id for e in sample(_examples(ids), 50, seed=42)]


def test_smaller_sample_is_a_prefix_of_larger():
    ids = [str(k) for k in range(100)]
    assert [e.id for e in sample(_examples(ids), 10)] == [e.id for e in sample(_examples(ids), 30)][:10]


def test_sample_more_than_available_returns_all_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="narrowgate.data"):
        out = sample(_examples(["b", "a", "c"]), 10)
    assert sorted(e.id for e in out) == ["a", "b", "c"]
    assert "only 3 are available" in caplog.text


def test_sample_none_returns_all_sorted_and_rejects_bad_input():
    assert [e.id for e in sample(_examples(["b", "c", "a"]), None)] == ["a", "b", "c"]
    assert sample(_examples(["a"]), 0) == []
    with pytest.raises(ValueError, match="'a' appears twice"):
        sample(_examples(["a", "a"]), 1)
    with pytest.raises(ValueError):
        sample(_examples(["a"]), -1)


def _labelled(spec):
    return [ClassExample(id=f"{label}-{k}", label=label, word=label) for label, count in spec for k in range(count)]


def test_sample_per_class_is_balanced_and_class_independent():
    examples = _labelled([("cat", 20), ("dog", 20), ("eel", 3)])
    out = sample_per_class(examples, 5, seed=1)
    groups = by_label(out)
    assert {k: len(v) for k, v in groups.items()} == {"cat": 5, "dog": 5, "eel": 3}
    assert [e.label for e in out] == sorted(e.label for e in out)
    without_dog = sample_per_class(_labelled([("cat", 20), ("eel", 3)]), 5, seed=1)
    assert [e.id for e in by_label(without_dog)["cat"]] == [e.id for e in groups["cat"]]
    shuffled = sample_per_class(list(reversed(examples)), 5, seed=1)
    assert [e.id for e in shuffled] == [e.id for e in out]
    assert [e.id for e in sample_per_class(examples, 5, seed=2)] != [e.id for e in out]
