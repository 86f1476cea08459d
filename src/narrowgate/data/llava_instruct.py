"""LLaVA-Instruct-150K: conversations about COCO images, as (image, prompt, answer) training examples.

The JSON file (``llava_instruct_150k.json``) is a list of ``{"id", "image": "000000033471.jpg",
"conversations": [{"from": "human", "value": "<image>\\nWhat ..."}, {"from": "gpt", "value": "..."}, ...]}``.
Images are COCO's, named as in ``train2017/``; ``train2014``-style names (``COCO_train2014_<id>.jpg``)
are found too. Each conversation gives one example: its first question (the ``<image>`` marker
removed) and the first answer; later turns are left out, since narrowgate prompts hold one image and
one question.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .base import DEFAULT_SEED, Example, sample

IMAGE_MARK = "<image>"


@dataclass(frozen=True, kw_only=True)
class InstructExample(Example):
    """An image with one instruction and the answer to learn."""

    prompt: str
    answer: str


def _image_path(folders: list[Path], name: str) -> Path:
    stem = Path(name).stem
    names = [name, f"COCO_train2014_{stem.zfill(12)}.jpg"]
    for folder in folders:
        for n in names:
            if (folder / n).is_file():
                return folder / n
    return folders[0] / name


def load_llava_instruct(
    path: str | Path, image_dir: str | Path | None = None, *, n: int | None = None, seed: int = DEFAULT_SEED
) -> list[InstructExample]:
    """Load the JSON at ``path`` (a file, or a folder holding ``llava_instruct_150k.json``).

    ``image_dir`` defaults to the first of ``train2017/``, ``train2014/``, ``coco/train2017/`` beside the file
    that exists; a missing image costs its example only (when it is loaded).
    """
    path = Path(path)
    if path.is_dir():
        path = next(
            iter(sorted(path.glob("llava_instruct_150k.json")) + sorted(path.glob("*.json"))),
            path / "llava_instruct_150k.json",
        )
    if not path.is_file():
        raise FileNotFoundError(f"No LLaVA-Instruct JSON at {path} (expected llava_instruct_150k.json).")
    base = path.parent
    folders = (
        [Path(image_dir)] if image_dir else [base / "train2017", base / "train2014", base / "coco" / "train2017", base]
    )
    folders = [f for f in folders if f.is_dir()] or folders
    out, seen = [], {}
    for item in json.loads(path.read_text()):
        turns = item.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt" or "image" not in item:
            continue
        prompt = turns[0]["value"].replace(IMAGE_MARK, "").strip()
        k = seen[str(item["id"])] = seen.get(str(item["id"]), -1) + 1
        out.append(
            InstructExample(
                id=f"{item['id']}-{k}",
                image_path=_image_path(folders, item["image"]),
                prompt=prompt,
                answer=turns[1]["value"].strip(),
            )
        )
    return sample(out, n, seed)
