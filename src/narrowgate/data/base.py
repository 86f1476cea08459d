"""Example types shared by every dataset loader, lazy image loading, and seeded sampling.

Loaders read only annotations up front; an image is opened when `Example.load_image` is called,
so sampling 2,000 examples out of a large dataset never touches the other images. A missing or
corrupt image raises `BadExample` for that example alone (the experiment runner records it as that
example's failure and goes on); `iter_images` does the same for a plain loop over examples.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, UnidentifiedImageError

from ..errors import DataError

logger = logging.getLogger("narrowgate.data")

DEFAULT_SEED = 42

E = TypeVar("E", bound="Example")


class BadExample(Exception):
    """The image of one example cannot be loaded; ``reason`` says why (missing, corrupt, ...)."""

    def __init__(self, example_id: str, reason: str):
        super().__init__(f"{example_id}: {reason}")
        self.example_id = example_id
        self.reason = reason


@dataclass(frozen=True)
class Skipped:
    """Record of an example left out of a run because its image could not be loaded."""

    id: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason}


@dataclass(frozen=True, kw_only=True)
class Example:
    """One dataset item: a stable string ``id`` and an image that is read only on demand.

    The image comes from exactly one of ``image_path`` (a file), ``image_bytes`` (encoded bytes,
    as stored in Hugging Face Parquet/Arrow files) or ``render`` (a function drawing it, used by
    the synthetic data). ``meta`` holds source-specific extras (VQAv2's ``multiple_choice_answer``,
    a Karpathy ``split``, the synthetic ``scene``); the typed fields are what every source provides.
    """

    id: str
    image_path: Path | None = None
    image_bytes: bytes | None = field(default=None, repr=False, compare=False)
    render: Callable[[], Image.Image] | None = field(default=None, repr=False, compare=False)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def load_image(self) -> Image.Image:
        """Decode the image fully and return it as RGB; raise `BadExample` if that is impossible."""
        if self.render is not None:
            return self.render().convert("RGB")
        if self.image_bytes is not None:
            return self._decode(io.BytesIO(self.image_bytes), "embedded image")
        if self.image_path is None:
            raise BadExample(self.id, "no image source")
        path = Path(self.image_path)
        if not path.is_file():
            raise BadExample(self.id, f"missing image: {path}")
        return self._decode(path, str(path))

    def _decode(self, source, where: str) -> Image.Image:
        try:
            with Image.open(source) as image:
                image.load()
                return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            detail = "not a recognised image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
            raise BadExample(self.id, f"corrupt image: {where} ({type(exc).__name__}: {detail})") from exc


@dataclass(frozen=True, kw_only=True)
class VQAExample(Example):
    """A visual question with its (usually 10) human answers, VQAv2 style."""

    question: str
    answers: tuple[str, ...] = ()
    image_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class CaptionExample(Example):
    """An image with its reference captions (5 for Flickr30k and most COCO images)."""

    references: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ClassExample(Example):
    """An image with a class ``label`` (an ImageNet wnid, or a synthetic attribute value) and its display ``word``."""

    label: str
    word: str


def iter_images(examples: Iterable[E], skipped: list[Skipped] | None = None) -> Iterator[tuple[E, Image.Image]]:
    """Yield ``(example, image)`` for every example whose image loads; skip and report the rest.

    Each bad example is logged as a warning and, when ``skipped`` is given, appended to it as a
    `Skipped` record, so the caller can write ``[s.as_dict() for s in skipped]`` into its results.
    """
    for example in examples:
        try:
            image = example.load_image()
        except BadExample as bad:
            logger.warning("skipping example %s", bad)
            if skipped is not None:
                skipped.append(Skipped(bad.example_id, bad.reason))
            continue
        yield example, image


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a file that is not valid JSON raises `DataError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); is it the right file, complete?") from e


class Stream:
    """``n`` examples made one at a time on every pass, never all held at once: a sized, re-iterable
    sequence for data of any size (the synthetic sets)."""

    def __init__(self, n: int, make: Callable[[], Iterator[E]]):
        self.n = n
        self._make = make

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[E]:
        return self._make()


def sample(examples: Sequence[E], n: int | None, seed: int = DEFAULT_SEED) -> list[E]:
    """Return ``n`` examples chosen at random, reproducibly.

    The examples are sorted by id before drawing, so the result depends only on the set of
    examples, ``n`` and ``seed``, never on the order files were listed in. The sample comes in
    drawn order, and a smaller ``n`` with the same seed gives a prefix of a larger one. ``n``
    larger than the number available returns all of them in drawn order, with a logged warning
    (not an error: a run on a smaller local copy still works, and its size is in its results).
    ``n=None`` means no sampling: all examples, sorted by id. Ids must be unique.
    """
    ordered = sorted(examples, key=lambda e: e.id)
    ids = [e.id for e in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError("example ids are not unique; sampling would not be reproducible")
    if n is not None and n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if n is not None and n > len(ordered):
        logger.warning("asked for %d examples but only %d are available; using all of them", n, len(ordered))
    if n is None:
        return ordered
    random.Random(seed).shuffle(ordered)
    return ordered[:n]


def sample_per_class(
    examples: Sequence[E],
    n_per_class: int | None,
    seed: int = DEFAULT_SEED,
    key: Callable[[E], Hashable] = lambda e: e.label,
) -> list[E]:
    """Draw ``n_per_class`` examples from each class (all of a smaller class), reproducibly.

    Each class is sampled with its own generator seeded from ``seed`` and the class key, so adding
    or removing a class never changes the images drawn for the others. Classes come out sorted.
    """
    groups = by_label(examples, key)
    out: list[E] = []
    for label in sorted(groups, key=str):
        members = sorted(groups[label], key=lambda e: e.id)
        rng = random.Random(f"{seed}:{label}")
        rng.shuffle(members)
        if n_per_class is not None and n_per_class > len(members):
            logger.warning("class %s has only %d examples (asked for %d)", label, len(members), n_per_class)
        out.extend(members if n_per_class is None else members[:n_per_class])
    return out


def by_label(examples: Iterable[E], key: Callable[[E], Hashable] = lambda e: e.label) -> dict[Hashable, list[E]]:
    """Group examples by class (``label`` by default), keeping their order within each class."""
    groups: dict[Hashable, list[E]] = defaultdict(list)
    for example in examples:
        groups[key(example)].append(example)
    return dict(groups)
