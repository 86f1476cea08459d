"""LLaVA-Instruct-150K: conversations about COCO images, as (image, prompt, answer) training examples.

The JSON file (``llava_instruct_150k.json``) is a list of ``{"id", "image": "000000033471.jpg",
"conversations": [{"from": "human", "value": "<image>\\nWhat ..."}, {"from": "gpt", "value": "..."}, ...]}``.
Images are COCO's, named as in ``train2017/``; ``train2014``-style names (``COCO_train2014_<id>.jpg``)
are found too. Each conversation gives one example: its first question (the ``<image>`` marker
removed) and the first answer; later turns are left out, since narrowgate prompts hold one image and
one question.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, DataMissing
from .base import DEFAULT_SEED, Example, entries, entry_id, image_of, read_json, sample, text_defect

IMAGE_MARK = "<image>"


@dataclass(frozen=True, kw_only=True)
class InstructExample(Example):
    """An image with one instruction and the answer to learn."""

    prompt: str
    answer: str


def _image_path(folders: list[Path], name: Any) -> tuple[Path | None, str | None]:
    """The image's path in the first folder that has it (or in the first folder), or why it cannot be used."""
    first, reason = image_of(folders[0], name)
    if reason:
        return None, reason
    names = [name, f"COCO_train2014_{Path(name).stem.zfill(12)}.jpg"]
    for folder in folders:
        for n in names:
            if (folder / n).is_file():
                return folder / n, None
    return first, None


def _find(path: Path) -> Path:
    """The JSON file of a folder: ``llava_instruct_150k.json``, else its only other JSON file."""
    if not path.is_dir():
        return path
    if (path / "manifest.json").is_file() and (path / "records").is_dir():
        raise DataError(
            f"{path} is a narrowgate run directory, not LLaVA-Instruct data: give the folder or file of "
            "llava_instruct_150k.json."
        )
    named = path / "llava_instruct_150k.json"
    others = sorted(path.glob("*.json"))
    if named.is_file() or len(others) != 1:
        if not named.is_file() and others:
            raise DataError(
                f"{path} holds {len(others)} JSON files and no llava_instruct_150k.json: give the file itself."
            )
        return named
    return others[0]


def _opens(turns: Any) -> bool:
    """Whether a conversation opens with a human turn answered by a gpt turn."""
    return (
        isinstance(turns, list)
        and len(turns) >= 2
        and all(isinstance(t, dict) for t in turns[:2])
        and (turns[0].get("from"), turns[1].get("from")) == ("human", "gpt")
    )


def load_llava_instruct(
    path: str | Path, image_dir: str | Path | None = None, *, n: int | None = None, seed: int = DEFAULT_SEED
) -> list[InstructExample]:
    """Load the JSON at ``path`` (a file, or a folder holding ``llava_instruct_150k.json``).

    ``image_dir`` defaults to the first of ``train2017/``, ``train2014/``, ``coco/train2017/`` beside the file
    that exists; a missing image costs its example only (when it is loaded). Conversations without an
    image or not opened by a human question and a gpt answer are left out; one whose question, answer or
    image name is not text is kept as a defective example (its failure record says why).
    """
    path = _find(Path(path))
    if not path.is_file():
        raise DataMissing(f"No LLaVA-Instruct JSON at {path} (expected llava_instruct_150k.json).")
    base = path.parent
    folders = (
        [Path(image_dir)] if image_dir else [base / "train2017", base / "train2014", base / "coco" / "train2017", base]
    )
    folders = [f for f in folders if f.is_dir()] or folders
    out, seen = [], dict[str, int]()
    for i, item in enumerate(entries(read_json(path), None, path, "LLaVA-Instruct data (a list of conversations)")):
        turns: Any = item.get("conversations")
        if "image" not in item or not _opens(turns):
            continue
        item_id = entry_id(item, "id", path, i)
        question, answer, image = turns[0].get("value"), turns[1].get("value"), item["image"]
        image_path, bad_image = _image_path(folders, image)
        defect = text_defect(question, "the question") or text_defect(answer, "the answer") or bad_image
        k = seen[item_id] = seen.get(item_id, -1) + 1
        out.append(
            InstructExample(
                id=f"{item_id}-{k}",
                image_path=image_path if defect is None else None,
                prompt=question.replace(IMAGE_MARK, "").strip() if defect is None else "",
                answer=answer.strip() if defect is None else "",
                defect=defect,
            )
        )
    return sample(out, n, seed)
