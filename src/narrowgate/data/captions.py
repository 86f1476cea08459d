"""Image captioning data: COCO (official captions JSON or Karpathy split) and Flickr30k.

Each example carries all reference captions of its image. Flickr30k also feeds the paper's
modality-gap experiment, whose prompts put an image before or after the five captions joined
into one text: `caption_text` and `iter_image_text` provide that text.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError, DataMissing
from .base import (
    DEFAULT_SEED,
    CaptionExample,
    describe,
    entries,
    entry_id,
    image_of,
    outside,
    read_json,
    sample,
    text_defect,
    unique,
)

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def _image_dir(given: str | Path | None, candidates: list[Path], what: str) -> Path:
    if given is not None:
        return Path(given)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataMissing(f"cannot find the {what}; pass it explicitly (looked for: {', '.join(map(str, candidates))})")


def _splits(split: str | Iterable[str]) -> set[str]:
    chosen = {split} if isinstance(split, str) else set(split)
    unknown = chosen - set(KARPATHY_SPLITS)
    if unknown:
        raise ValueError(f"unknown Karpathy split(s) {sorted(unknown)}; choose from {KARPATHY_SPLITS}")
    return chosen


def load_coco_captions(
    annotations: str | Path,
    image_dir: str | Path | None = None,
    *,
    n: int | None = None,
    seed: int = DEFAULT_SEED,
) -> list[CaptionExample]:
    """Load COCO from an official ``captions_<split>.json``; the id is the COCO image id.

    ``image_dir`` defaults to the ``<split>/`` folder beside the file or beside its parent
    (the usual ``annotations/`` layout). References are in annotation-id order; images without
    captions are left out.
    """
    annotations = Path(annotations)
    doc = read_json(annotations)
    match = re.match(r"captions_(\w+)\.json$", annotations.name)
    split = match.group(1) if match else "val2014"
    folder = _image_dir(image_dir, [annotations.parent.parent / split, annotations.parent / split], "COCO image folder")
    what = "a COCO captions file"
    captions: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    for k, ann in enumerate(entries(doc, "annotations", annotations, what)):
        order = ann.get("id", k)
        captions[entry_id(ann, "image_id", annotations, k)].append(
            (order if isinstance(order, int) else k, ann.get("caption"))
        )
    examples = []
    for k, image in enumerate(entries(doc, "images", annotations, what)):
        image_id = entry_id(image, "id", annotations, k)
        if not captions.get(image_id):
            continue
        texts = [text for _, text in sorted(captions[image_id], key=lambda c: c[0])]
        examples.append(_example(image_id, folder, image.get("file_name"), texts, annotations))
    return sample(unique(examples, annotations, "image id"), n, seed)


def _example(example_id: str, folder: Path, name: Any, texts: Any, source: Path, **extra) -> CaptionExample:
    """A captioned image, defective when its file name or captions are not text (or there are none)."""
    if not isinstance(texts, list):
        defect: str | None = f"captions are {describe(texts)}, not a list"
    elif not texts:
        defect = "no captions"
    else:
        defect = next((d for d in (text_defect(t, "a caption") for t in texts) if d), None)
    image_path, bad_name = image_of(folder, name)
    defect = bad_name or defect
    return CaptionExample(
        id=example_id,
        image_path=image_path,
        references=tuple(t.strip() for t in texts) if defect is None else (),
        defect=defect,
        **extra,
    )


def _join(folder: str | None, name: Any) -> Any:
    """A Karpathy entry's ``filepath/filename`` (the name alone without a filepath; a bad name as it is)."""
    return f"{folder}/{name}" if folder and isinstance(name, str) and name else name


def _in(image: dict, splits: set[str]) -> bool:
    """Whether a Karpathy entry belongs to one of ``splits`` (an entry without a text split belongs to none)."""
    split = image.get("split")
    return isinstance(split, str) and split in splits


def _sentences(value: Any) -> Any:
    """The raw captions of a Karpathy entry's ``sentences`` (a list of ``{"raw": ...}``), or the bad value."""
    if not isinstance(value, list):
        return value
    return [s.get("raw") if isinstance(s, dict) else s for s in value]


def load_coco_karpathy(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str | Iterable[str] = "test",
    *,
    n: int | None = None,
    seed: int = DEFAULT_SEED,
) -> list[CaptionExample]:
    """Load COCO from the Karpathy split file ``dataset_coco.json``; the id is the COCO id.

    Images are at ``image_root/<filepath>/<filename>``; ``image_root`` defaults to the folder of
    the file or its parent, whichever has the ``val2014/`` folder. ``split`` is one of
    `KARPATHY_SPLITS` or several of them (e.g. ``("train", "restval")``).
    """
    path = Path(path)
    chosen = _splits(split)
    images = [im for im in entries(read_json(path), "images", path, "a Karpathy split file") if _in(im, chosen)]
    for k, im in enumerate(images):
        if not isinstance(im.get("filepath", ""), str):
            raise DataError(f"{path}: image {k} has filepath {describe(im.get('filepath'))}; expected a folder name.")
    if image_root is None:
        filepaths = {im.get("filepath", "") for im in images if not outside(path.parent, im.get("filepath") or ".")}
        candidates = [path.parent, path.parent.parent]
        image_root = next((c for c in candidates if all((c / fp).is_dir() for fp in filepaths)), None)
        if image_root is None:
            raise DataMissing(
                f"cannot find the COCO image root (with {sorted(filepaths)} inside) in {candidates}; pass image_root"
            )
    examples = [
        _example(
            entry_id(im, "cocoid", path, k),
            Path(image_root),
            _join(im.get("filepath"), im.get("filename")),
            _sentences(im.get("sentences")),
            path,
            meta={"split": im["split"]},
        )
        for k, im in enumerate(images)
    ]
    return sample(unique(examples, path, "cocoid"), n, seed)


def load_flickr30k(
    path: str | Path,
    image_dir: str | Path | None = None,
    split: str | Iterable[str] | None = None,
    *,
    n: int | None = None,
    seed: int = DEFAULT_SEED,
) -> list[CaptionExample]:
    """Load Flickr30k from the Karpathy file ``dataset_flickr30k.json`` or ``results_20130124.token``.

    The format is told by the file's extension (``.json`` or anything else for the token file,
    whose lines read ``1000092795.jpg#0<TAB>caption``). ``split=None`` means ``"test"`` for the
    Karpathy file and every image for the token file, which has no splits (passing a split with
    it is an error). ``image_dir`` defaults to ``flickr30k-images/`` beside the file or its
    parent. The id is the file name without extension; references keep their numbering order.
    """
    path = Path(path)
    folder = _image_dir(
        image_dir, [path.parent / "flickr30k-images", path.parent.parent / "flickr30k-images"], "Flickr30k image folder"
    )
    if path.suffix == ".json":
        chosen = _splits("test" if split is None else split)
        examples = []
        for k, im in enumerate(entries(read_json(path), "images", path, "a Karpathy split file")):
            if not _in(im, chosen):
                continue
            name = im.get("filename")
            if not isinstance(name, str) or not name.strip():
                raise DataError(f"{path}: image {k} has filename {describe(name)}; expected an image file name.")
            examples.append(
                _example(
                    Path(name).stem, folder, name, _sentences(im.get("sentences")), path, meta={"split": im["split"]}
                )
            )
    else:
        if split is not None:
            raise ValueError(
                f"{path.name} has no splits; use the Karpathy file dataset_flickr30k.json for split={split!r}"
            )
        captions: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for line_no, line in enumerate(_token_lines(path), 1):
            if not line.strip():
                continue
            key, sep, text = line.partition("\t")
            filename, _, index = key.partition("#")
            if not sep or not index.isascii() or not index.isdigit() or not filename.strip():
                raise DataError(
                    f"{path}:{line_no}: expected '<file>#<n><TAB><caption>', got {line[:80]!r}: the file is damaged "
                    "(a tab turned into spaces?); download results_20130124.token again."
                )
            captions[filename].append((int(index), text))
        examples = [
            _example(Path(filename).stem, folder, filename, [text for _, text in sorted(caps)], path)
            for filename, caps in captions.items()
        ]
    return sample(unique(examples, path, "image"), n, seed)


def _token_lines(path: Path) -> list[str]:
    """The lines of a Flickr30k token file, which is UTF-8 (a Latin-1 copy is refused, naming the line)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line} is not UTF-8 text (byte {raw[e.start]:#04x}); the official file is UTF-8: convert this "
            f"copy (e.g. iconv -f latin1 -t utf-8) or download it again."
        ) from None


def caption_text(example: CaptionExample) -> str:
    """All reference captions of ``example`` joined by single spaces: the text of a modality-gap prompt."""
    return " ".join(c.strip() for c in example.references)
