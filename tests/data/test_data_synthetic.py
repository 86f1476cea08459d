"""Synthetic shapes: determinism, labels that match the pixels, and the task views."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from narrowgate.data import (
    COLORS,
    POSITIONS,
    QUESTIONS,
    SHAPES,
    CaptionExample,
    ClassExample,
    Scene,
    VQAExample,
    by_label,
    iter_images,
    make_scenes,
    render_scene,
    sample,
    synthetic_captions,
    synthetic_class_pairs,
    synthetic_classes,
    synthetic_vqa,
)
from narrowgate.data.synthetic import BACKGROUND, GRID, make_scene, scene_captions


def test_same_seed_same_images_and_labels():
    a, b = synthetic_captions(20, seed=3), synthetic_captions(20, seed=3)
    assert a == b
    assert all(x.load_image().tobytes() == y.load_image().tobytes() for x, y in zip(a, b))
    c = synthetic_captions(20, seed=4)
    assert [x.meta["scene"] for x in a] != [x.meta["scene"] for x in c]
    assert make_scenes(5, seed=3) == make_scenes(20, seed=3)[:5]


@pytest.mark.parametrize("size", [24, 64, 97])
def test_labels_match_pixels(size):
    for example in synthetic_captions(300, seed=size, size=size):
        scene = example.meta["scene"]
        pixels = np.asarray(example.load_image())
        assert pixels.shape == (size, size, 3)
        assert tuple(pixels[int(scene.cy), int(scene.cx)]) == COLORS[scene.color], scene
        drawn = np.argwhere((pixels != BACKGROUND).any(axis=2))
        assert len(drawn) > 0
        assert all(tuple(pixels[y, x]) == COLORS[scene.color] for y, x in drawn)
        cell = size / GRID
        row, col = scene.cell
        assert POSITIONS[GRID * row + col] == scene.position
        assert drawn[:, 0].min() >= int(row * cell) and drawn[:, 0].max() <= int((row + 1) * cell)
        assert drawn[:, 1].min() >= int(col * cell) and drawn[:, 1].max() <= int((col + 1) * cell)


def test_shapes_are_distinguishable():
    masks = {}
    for shape in SHAPES:
        scene = make_scene(random.Random(0), 96, shape=shape, color="red", position="center")
        masks[shape] = (np.asarray(render_scene(scene)) != BACKGROUND).any(axis=2)
    for s in SHAPES:
        for t in SHAPES:
            if s < t:
                assert (masks[s] != masks[t]).sum() > 20, (s, t)


def test_captions_describe_the_scene():
    for example in synthetic_captions(50):
        assert isinstance(example, CaptionExample)
        scene = example.meta["scene"]
        assert len(example.references) == 5 and len(set(example.references)) == 5
        assert all(scene.color in r and scene.shape in r for r in example.references)
    scene = Scene("star", "blue", "top left", 64, 10.0, 10.0, 7.0)
    assert scene_captions(scene)[0] == "a blue star in the top left"
    assert scene_captions(Scene("circle", "red", "center", 64, 32.0, 32.0, 7.0))[0] == "a red circle in the center"


def test_vqa_questions_have_ten_matching_answers():
    examples = synthetic_vqa(300, seed=5)
    kinds = {e.meta["kind"] for e in examples}
    assert kinds == set(QUESTIONS)
    for e in examples:
        assert isinstance(e, VQAExample)
        scene = e.meta["scene"]
        assert e.question == QUESTIONS[e.meta["kind"]]
        assert e.answers == (getattr(scene, e.meta["kind"]),) * 10
    assert [e.meta["scene"] for e in examples[:10]] == [c.meta["scene"] for c in synthetic_captions(10, seed=5)]
    only_color = synthetic_vqa(20, kinds=("color",))
    assert {e.question for e in only_color} == {"What color is the shape?"}
    assert all(e.answers[0] in COLORS for e in only_color)
    with pytest.raises(ValueError):
        synthetic_vqa(5, kinds=("size",))
    assert len({e.id for e in examples}) == 300


def test_class_examples_are_balanced_and_pairs_cover_classes():
    for attribute, values in (("shape", SHAPES), ("color", tuple(COLORS)), ("position", POSITIONS)):
        examples = synthetic_classes(4, seed=1, attribute=attribute)
        assert all(isinstance(e, ClassExample) for e in examples)
        groups = by_label(examples)
        assert set(groups) == set(values) and all(len(g) == 4 for g in groups.values())
        assert all(getattr(e.meta["scene"], attribute) == e.label == e.word for e in examples)
        assert len({e.id for e in examples}) == len(examples)
        pairs = synthetic_class_pairs(attribute)
        members = [v for p in pairs for v in p]
        assert len(members) == len(set(members)) and set(members) <= set(values) and len(pairs) == len(values) // 2
    assert [e.id for e in synthetic_classes(3, seed=1)] == [e.id for e in synthetic_classes(3, seed=1)]
    circles = by_label(synthetic_classes(3, seed=1))["circle"]
    assert [e.meta["scene"] for e in circles] == [
        e.meta["scene"] for e in by_label(synthetic_classes(5, seed=1))["circle"][:3]
    ]
    with pytest.raises(ValueError):
        synthetic_classes(2, attribute="size")


def test_synthetic_examples_work_with_the_generic_helpers():
    examples = synthetic_vqa(50)
    assert [e.id for e in sample(examples, 10, seed=1)] == [e.id for e in sample(list(reversed(examples)), 10, seed=1)]
    skipped = []
    assert len(list(iter_images(examples, skipped))) == 50 and skipped == []


def test_small_size_is_rejected():
    with pytest.raises(ValueError, match="at least"):
        synthetic_captions(1, size=12)


def test_generation_is_fast():
    start = time.perf_counter()
    images = [e.load_image() for e in synthetic_captions(2000, size=64)]
    elapsed = time.perf_counter() - start
    assert len(images) == 2000
    assert elapsed < 5.0, f"2000 images took {elapsed:.2f} s"
