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

from .base import DEFAULT_SEED, CaptionExample, read_json, sample

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def _image_dir(given: str | Path | None, candidates: list[Path], what: str) -> Path:
    if given is not None:
        return Path(given)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"cannot find the {what}; pass it explicitly (looked for: {', '.join(map(str, candidates))})"
    )


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
    captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for k, ann in enumerate(doc["annotations"]):
        captions[ann["image_id"]].append((ann.get("id", k), ann["caption"].strip()))
    examples = [
        CaptionExample(
            id=str(image["id"]),
            image_path=folder / image["file_name"],
            references=tuple(text for _, text in sorted(captions[image["id"]])),
        )
        for image in doc["images"]
        if captions.get(image["id"])
    ]
    return sample(examples, n, seed)


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
    images = [im for im in read_json(path)["images"] if im["split"] in chosen]
    if image_root is None:
        filepaths = {im.get("filepath", "") for im in images}
        candidates = [path.parent, path.parent.parent]
        image_root = next((c for c in candidates if all((c / fp).is_dir() for fp in filepaths)), None)
        if image_root is None:
            raise FileNotFoundError(
                f"cannot find the COCO image root (with {sorted(filepaths)} inside) in {candidates}; pass image_root"
            )
    examples = [
        CaptionExample(
            id=str(im["cocoid"]),
            image_path=Path(image_root) / im.get("filepath", "") / im["filename"],
            references=tuple(s["raw"].strip() for s in im["sentences"]),
            meta={"split": im["split"]},
        )
        for im in images
    ]
    return sample(examples, n, seed)


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
        examples = [
            CaptionExample(
                id=Path(im["filename"]).stem,
                image_path=folder / im["filename"],
                references=tuple(s["raw"].strip() for s in im["sentences"]),
                meta={"split": im["split"]},
            )
            for im in read_json(path)["images"]
            if im["split"] in chosen
        ]
    else:
        if split is not None:
            raise ValueError(
                f"{path.name} has no splits; use the Karpathy file dataset_flickr30k.json for split={split!r}"
            )
        captions: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            key, sep, text = line.partition("\t")
            filename, _, index = key.partition("#")
            if not sep or not index.isdigit():
                raise ValueError(f"{path}:{line_no}: expected '<file>#<n>\\t<caption>', got {line!r}")
            captions[filename].append((int(index), text.strip()))
        examples = [
            CaptionExample(
                id=Path(filename).stem,
                image_path=folder / filename,
                references=tuple(text for _, text in sorted(caps)),
            )
            for filename, caps in captions.items()
        ]
    return sample(examples, n, seed)


def caption_text(example: CaptionExample) -> str:
    """All reference captions of ``example`` joined by single spaces: the text of a modality-gap prompt."""
    return " ".join(c.strip() for c in example.references)
