"""ImageNet from the standard class-folder tree, and the paper's animal classes and patching pairs.

The paper (SM 7.4) uses 100 ImageNet-1k animal classes with 100 images each, prompted as
"<image> This animal is a", and 10 class pairs for activation patching. Both ship with the
package (``resources/imagenet_animals.json``), each class with its WordNet id, the synset name
printed in the paper and its display word, the synset's first WordNet lemma.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import DataMissing
from .base import DEFAULT_SEED, ClassExample, sample, sample_per_class

RESOURCE = Path(__file__).resolve().parent.parent / "resources" / "imagenet_animals.json"

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})

#: Files in an ImageNet root that map wnids to their names, first name first (Kaggle, Caffe layouts).
WORD_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")


@dataclass(frozen=True)
class ImageNetClass:
    """An ImageNet class: WordNet id (``n`` + 8 digits), display word, and WordNet synset name."""

    wnid: str
    word: str
    synset: str


@lru_cache(maxsize=1)
def _resource() -> dict:
    return json.loads(RESOURCE.read_text())


def animal_classes() -> tuple[ImageNetClass, ...]:
    """The paper's 100 animal classes, in the order the paper lists them."""
    return tuple(ImageNetClass(**c) for c in _resource()["animals"])


def class_pairs() -> tuple[tuple[ImageNetClass, ImageNetClass], ...]:
    """The paper's 10 activation-patching class pairs, as printed in SM 7.4.

    Most of their classes are not among the 100 of `animal_classes` (the paper chose them
    separately); all are ImageNet-1k animal classes.
    """
    known = {c.wnid: c for c in known_classes()}
    return tuple((known[a], known[b]) for a, b in _resource()["pairs"])


def known_classes() -> tuple[ImageNetClass, ...]:
    """Every class named by the paper: the 100 animals, then the other classes of the pairs."""
    return animal_classes() + tuple(ImageNetClass(**c) for c in _resource()["pair_classes"])


def class_word(wnid: str) -> str:
    """The display word of a class the paper names; KeyError for any other wnid."""
    for c in known_classes():
        if c.wnid == wnid:
            return c.word
    raise KeyError(f"{wnid} is not one of the paper's classes")


def _root_words(root: Path) -> dict[str, str]:
    for name in WORD_FILES:
        for candidate in (root / name, root.parent / name):
            if candidate.is_file():
                words = {}
                for line in candidate.read_bytes().decode("utf-8", errors="replace").splitlines():
                    wnid, _, names = line.strip().partition(" ")
                    if names:
                        words[wnid] = names.split(",")[0].strip()
                return words
    return {}


def load_imagenet(
    root: str | Path,
    split: str | None = "val",
    *,
    classes: str | Iterable[str] | None = None,
    n_per_class: int | None = None,
    n: int | None = None,
    seed: int = DEFAULT_SEED,
) -> list[ClassExample]:
    """Load images from ``root/split/<wnid>/*.JPEG`` (``split=None``: class folders are directly in ``root``).

    ``classes`` restricts the classes: ``"animals"`` (the paper's 100), ``"pairs"`` (the 20
    classes of the patching pairs), or an iterable of wnids; a requested class without a folder
    is an error. ``n_per_class`` samples that many images per class (the paper: 100), then ``n``
    samples from the result; both are seeded. The id is ``<wnid>/<file stem>``; ``word`` is the
    paper's word for the class, else the first name in a ``LOC_synset_mapping.txt`` or
    ``synset_words.txt`` next to the tree, else the wnid.
    """
    root = Path(root)
    tree = root / split if split is not None else root
    if not tree.is_dir():
        raise DataMissing(f"no ImageNet class folders at {tree}")
    if classes == "animals":
        wanted: set[str] | None = {c.wnid for c in animal_classes()}
    elif classes == "pairs":
        wanted = {c.wnid for pair in class_pairs() for c in pair}
    elif isinstance(classes, str):
        raise ValueError(f"classes must be 'animals', 'pairs' or an iterable of wnids, got {classes!r}")
    else:
        wanted = None if classes is None else set(classes)
    folders = {d.name: d for d in tree.iterdir() if d.is_dir() and (wanted is None or d.name in wanted)}
    absent = sorted(wanted - folders.keys()) if wanted is not None else []
    if absent:
        raise DataMissing(f"{len(absent)} requested classes have no folder in {tree}, e.g. {absent[:5]}")
    words = {c.wnid: c.word for c in known_classes()}
    fallback = _root_words(root) if set(folders) - words.keys() else {}
    examples = [
        ClassExample(
            id=f"{wnid}/{f.stem}",
            image_path=f,
            label=wnid,
            word=words.get(wnid) or fallback.get(wnid) or wnid,
        )
        for wnid, folder in folders.items()
        for f in folder.iterdir()
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if n_per_class is not None:
        examples = sample_per_class(examples, n_per_class, seed)
    return sample(examples, n, seed)
