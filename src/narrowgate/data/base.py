"""Example types shared by every dataset loader, lazy image loading, and seeded sampling.

Loaders read only annotations up front; an image is opened when `Example.load_image` is called,
so sampling 2,000 examples out of a large dataset never touches the other images. A missing or
corrupt image raises `BadExample` for that example alone (the experiment runner records it as that
example's failure and goes on); `iter_images` does the same for a plain loop over examples.

Annotation files are checked as they are read: a file of the wrong shape (not the object or list
expected, entries that are not objects, an id missing or given twice) raises `DataError` naming the
file and the entry; a field of one entry with the wrong kind of value (a question that is null or a
number, a caption that is not text, an image id that is not a number) makes that example *defective*:
it keeps its id and `load_image` raises `BadExample` with the reason, so it becomes a failure record.
Every image path named inside an annotation file must stay inside its folder (`image_in`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Generic, TypeVar

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
        """The record as a plain dict, for a run's results."""
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
    #: Why the annotations of this example cannot be used (e.g. "question is null, not text"), or None.
    defect: str | None = field(default=None, compare=False)

    def load_image(self) -> Image.Image:
        """Decode the image fully and return it as RGB; raise `BadExample` if that is impossible (or the
        example is `defect`ive)."""
        if self.defect is not None:
            raise BadExample(self.id, self.defect)
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
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); is it the right file, complete?") from e
    except RecursionError:
        raise DataError(f"{path} is not a dataset file: its JSON is nested too deeply to read.") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not the JSON file expected there.") from None


def describe(value: Any) -> str:
    """A JSON value as a message names it: ``null``, ``the number 12345``, ``a list``, ``the text 'x'``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    names: dict[type, str] = {list: "a list", dict: "an object"}
    return names.get(type(value), f"a {type(value).__name__}")


def entries(doc: Any, key: str | None, path: Path, what: str) -> list[dict]:
    """``doc[key]`` (``doc`` itself when ``key`` is None) as a list of JSON objects, else `DataError` naming
    ``path`` as not being ``what`` (e.g. "a VQAv2 questions file")."""
    if key is None:
        items = doc
        if not isinstance(items, list):
            raise DataError(f"{path} is not {what}: expected a JSON list, found {describe(doc)}.")
    else:
        if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
            found = describe(doc) if not isinstance(doc, dict) else f"{key!r} is {describe(doc.get(key))}"
            raise DataError(f"{path} is not {what}: expected an object with a list {key!r}, found {found}.")
        items = doc[key]
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(
                f"{path} is not {what}: entry {i} of {key or 'the list'} is {describe(item)}, not an object."
            )
    return items


def entry_id(entry: dict, key: str, path: Path, index: int) -> str:
    """The id ``entry[key]`` (a whole number, or non-empty text) as a string, else `DataError`."""
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{path}: entry {index} has {key} {describe(value)}; expected a number or a name.")
    return str(value)


def unique(examples: list[E], path: Path | str, key: str = "id") -> list[E]:
    """``examples``, after checking that no id repeats (two entries for one id would be mixed up)."""
    seen: set[str] = set()
    for e in examples:
        if e.id in seen:
            raise DataError(
                f"{path} has two entries with {key} {e.id!r}: the file is damaged or two files were merged."
            )
        seen.add(e.id)
    return examples


def text_defect(value: Any, what: str) -> str | None:
    """None when ``value`` is text, else the reason an example with it is defective."""
    return None if isinstance(value, str) else f"{what} is {describe(value)}, not text"


def outside(folder: Path, name: str) -> str | None:
    """Why the image ``name`` read from an annotation file would lie outside ``folder`` (an absolute path, a
    ``..`` step, a drive), or None when ``folder / name`` stays inside it. Symbolic links the user made inside
    the folder are followed as usual: only the names written in the file are judged."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    drive = len(name) > 1 and name[1] == ":" and name[0].isalpha()
    if not name.strip() or "\x00" in name or name.startswith(("/", "\\")) or ".." in parts or drive:
        return (
            f"the image {name[:80]!r} is not a file inside {folder}: narrowgate opens only images inside the data "
            "directory (a symbolic link inside it is fine)"
        )
    return None


def image_in(folder: Path, name: str, source: Path | str) -> Path:
    """``folder / name`` for a folder or image ``name`` read from the file ``source``; `DataError` if it is `outside`."""
    reason = outside(folder, name)
    if reason:
        raise DataError(f"{source} names {reason[4:]}. The file is damaged or not meant for this folder.")
    return folder / name


def image_of(folder: Path, name: Any) -> tuple[Path | None, str | None]:
    """``(folder / name, None)`` for an example's image ``name``, or ``(None, why it cannot be used)``: a name that is
    not text, or one `outside` the folder (that example fails; nothing is opened)."""
    if not isinstance(name, str) or not name:
        return None, f"the image name is {describe(name)}, not a file name"
    reason = outside(folder, name)
    return (None, reason) if reason else (folder / name, None)


def _file_digest(path: Path, sample: int = 4096) -> list:
    """A file's path, size and a SHA-256 of its first and last ``sample`` bytes (None parts when it is absent)."""
    if not path.is_file():
        return [str(path), None, None]
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(sample)
            f.seek(max(0, size - sample))
            tail = f.read(sample)
    except OSError:
        return [str(path), None, None]
    return [str(path), size, hashlib.sha256(head + tail).hexdigest()]


def example_digest(example: Example) -> str:
    """What identifies one example's data, so a resume that would mix changed data is refused.

    A SHA-256 over its id, annotations (question, answers, references, label, prompt...), defect, and
    image: an image file's path, size and first and last 4 KiB (read cheaply, never whole), or the
    SHA-256 of embedded bytes. A drawn image (synthetic) is made from the run's settings, which the
    manifest compares already.
    """
    skip = ("image_path", "image_bytes", "render", "meta")
    fields = {k: v for k, v in vars(example).items() if k not in skip}
    if example.image_path is not None:
        fields["image"] = _file_digest(Path(example.image_path))
    elif example.image_bytes is not None:
        fields["image"] = hashlib.sha256(example.image_bytes).hexdigest()
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=repr).encode()).hexdigest()


class Stream(Generic[E]):
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
    twice = next((a.id for a, b in zip(ordered, ordered[1:]) if a.id == b.id), None)
    if twice is not None:
        raise DataError(f"Example id {twice!r} appears twice: ids must be unique for a reproducible sample.")
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
    key: Callable[[E], Hashable] = lambda e: _label(e),
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


def _label(example: Any) -> Hashable:
    """The class of a labelled example (`ClassExample`, the synthetic sets)."""
    return example.label


def by_label(examples: Iterable[E], key: Callable[[E], Hashable] = _label) -> dict[Hashable, list[E]]:
    """Group examples by class (``label`` by default), keeping their order within each class."""
    groups: dict[Hashable, list[E]] = defaultdict(list)
    for example in examples:
        groups[key(example)].append(example)
    return dict(groups)
