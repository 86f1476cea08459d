"""Synthetic images with known labels: one coloured shape in one cell of a 3 x 3 grid.

They stand in for the real datasets in tests and demos and train small model organisms, so
every task has a synthetic version in the same example types as the real loaders: captions
(`synthetic_captions`), VQA with 10 answers (`synthetic_vqa`), class labels
(`synthetic_classes`) and class pairs for patching (`synthetic_class_pairs`). Everything is
deterministic given the seed, and an image is drawn only when `Example.load_image` is called.
The whole shape lies inside its labelled cell and its centre pixel has the labelled colour.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

from PIL import Image, ImageDraw

from .base import DEFAULT_SEED, CaptionExample, ClassExample, VQAExample

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}

#: Grid cells, row by row from the top left; a position's index is ``3 * row + column``.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")

POSITION_PHRASES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}

QUESTIONS = {
    "color": "What color is the shape?",
    "shape": "What shape is it?",
    "position": "Where is the shape?",
}

ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "position": POSITIONS}

BACKGROUND = (255, 255, 255)
GRID = 3
MIN_SIZE = 24
DEFAULT_SIZE = 64


@dataclass(frozen=True)
class Scene:
    """What one synthetic image shows, with the geometry needed to draw it (pixels, floats)."""

    shape: str
    color: str
    position: str
    size: int
    cx: float
    cy: float
    radius: float

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) of the grid cell named by ``position``."""
        return divmod(POSITIONS.index(self.position), GRID)


def make_scene(
    rng: random.Random,
    size: int = DEFAULT_SIZE,
    *,
    shape: str | None = None,
    color: str | None = None,
    position: str | None = None,
) -> Scene:
    """Draw a random scene; any attribute given is fixed instead of drawn."""
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    shape = shape if shape is not None else rng.choice(SHAPES)
    color = color if color is not None else rng.choice(tuple(COLORS))
    position = position if position is not None else rng.choice(POSITIONS)
    if shape not in SHAPES or color not in COLORS or position not in POSITIONS:
        raise ValueError(f"unknown shape, color or position: {shape!r}, {color!r}, {position!r}")
    cell = size / GRID
    radius = cell * rng.uniform(0.28, 0.42)
    slack = (cell / 2 - radius) / 2
    row, col = divmod(POSITIONS.index(position), GRID)
    cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
    cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
    return Scene(shape, color, position, size, cx, cy, radius)


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.45 * r
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def render_scene(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an RGB image (no anti-aliasing, so every shape pixel has the exact colour)."""
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = COLORS[scene.color]
    cx, cy, r = scene.cx, scene.cy, scene.radius
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.866 * r, cy + r / 2), (cx - 0.866 * r, cy + r / 2)], fill=fill)
    elif scene.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif scene.shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    else:
        w = max(1.0, 0.3 * r)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    return image


def iter_scenes(n: int, seed: int = DEFAULT_SEED, *, size: int = DEFAULT_SIZE) -> Iterator[Scene]:
    """`make_scenes`, one scene at a time."""
    rng = random.Random(seed)
    for _ in range(n):
        yield make_scene(rng, size)


def make_scenes(n: int, seed: int = DEFAULT_SEED, *, size: int = DEFAULT_SIZE) -> list[Scene]:
    """``n`` random scenes, the same for the same seed (and each a prefix of any longer list)."""
    return list(iter_scenes(n, seed, size=size))


def scene_captions(scene: Scene) -> tuple[str, ...]:
    """Five reference captions describing ``scene``."""
    c, s, where = scene.color, scene.shape, POSITION_PHRASES[scene.position]
    return (
        f"a {c} {s} {where}",
        f"there is a {c} {s} {where}",
        f"a {c} {s} on a white background, {where}",
        f"a picture of a {c} {s} {where}",
        f"a single {s} colored {c} {where}",
    )


def scene_answer(scene: Scene, kind: str) -> str:
    """The answer to question ``kind`` (a key of `QUESTIONS`) about ``scene``."""
    return getattr(scene, kind)


def synthetic_captions(n: int, seed: int = DEFAULT_SEED, *, size: int = DEFAULT_SIZE) -> list[CaptionExample]:
    """``n`` captioning examples; ``meta["scene"]`` holds the labels. Ids are ``s<seed>-<index>``."""
    return list(iter_synthetic_captions(n, seed, size=size))


def iter_synthetic_captions(n: int, seed: int = DEFAULT_SEED, *, size: int = DEFAULT_SIZE) -> Iterator[CaptionExample]:
    """`synthetic_captions`, one example at a time (any ``n`` in constant memory)."""
    for i, sc in enumerate(iter_scenes(n, seed, size=size)):
        yield CaptionExample(
            id=f"s{seed}-{i:06d}", render=partial(render_scene, sc), references=scene_captions(sc), meta={"scene": sc}
        )


def synthetic_vqa(
    n: int, seed: int = DEFAULT_SEED, *, size: int = DEFAULT_SIZE, kinds: tuple[str, ...] = tuple(QUESTIONS)
) -> list[VQAExample]:
    """``n`` VQA examples over the same scenes as `synthetic_captions`, one question each.

    The question kind is drawn from ``kinds`` (keys of `QUESTIONS`); its answer is repeated 10
    times, like VQAv2's 10 annotators. Ids are ``s<seed>-<index>-<kind>``.
    """
    return list(iter_synthetic_vqa(n, seed, size=size, kinds=kinds))


def iter_synthetic_vqa(
    n: int, seed: int = DEFAULT_SEED, *, size: int = DEFAULT_SIZE, kinds: tuple[str, ...] = tuple(QUESTIONS)
) -> Iterator[VQAExample]:
    """`synthetic_vqa`, one example at a time (any ``n`` in constant memory)."""
    unknown = set(kinds) - set(QUESTIONS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {tuple(QUESTIONS)}, got {kinds}")
    rng = random.Random(f"{seed}:vqa")
    for i, sc in enumerate(iter_scenes(n, seed, size=size)):
        kind = rng.choice(kinds)
        yield VQAExample(
            id=f"s{seed}-{i:06d}-{kind}",
            render=partial(render_scene, sc),
            question=QUESTIONS[kind],
            answers=(scene_answer(sc, kind),) * 10,
            image_id=f"s{seed}-{i:06d}",
            meta={"scene": sc, "kind": kind},
        )


def synthetic_classes(
    n_per_class: int, seed: int = DEFAULT_SEED, *, size: int = DEFAULT_SIZE, attribute: str = "shape"
) -> list[ClassExample]:
    """``n_per_class`` images for each value of ``attribute`` (shape, color or position).

    The label and the word are the attribute's value; the other attributes are random. Each
    class has its own generator, so its images do not depend on the other classes. Ids are
    ``s<seed>-<value>-<index>``.
    """
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {tuple(ATTRIBUTES)}, got {attribute!r}")
    examples = []
    for value in ATTRIBUTES[attribute]:
        rng = random.Random(f"{seed}:{attribute}:{value}")
        for i in range(n_per_class):
            sc = make_scene(rng, size, **{attribute: value})
            examples.append(
                ClassExample(
                    id=f"s{seed}-{value.replace(' ', '_')}-{i:04d}",
                    render=partial(render_scene, sc),
                    label=value,
                    word=value,
                    meta={"scene": sc},
                )
            )
    return examples


def synthetic_class_pairs(attribute: str = "shape") -> tuple[tuple[str, str], ...]:
    """Disjoint class pairs for patching: consecutive values of ``attribute`` (the last one unpaired if odd)."""
    values = ATTRIBUTES[attribute]
    return tuple((values[k], values[k + 1]) for k in range(0, len(values) - 1, 2))
