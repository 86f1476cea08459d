"""Miniature copies of the fine-tuning recipes' training data in their distributed layouts, with tiny images.

- LLaVA-Instruct-150K: ``llava_instruct_150k.json`` with COCO ``train2017/`` images beside it.
- VQAv2 train: the official ``train2014`` questions/annotations JSONs and COCO ``train2014/`` images.
- COCO captions: ``annotations/captions_train2014.json`` with ``train2014/`` images.
"""

from __future__ import annotations

from pathlib import Path

from tests.data import layouts
from tests.data.helpers import write_jpeg, write_json
from tests.data.layouts import WORDS, _caption, _color


def llava_instruct(root: Path, n: int = 12, answers: dict[int, str] | None = None) -> Path:
    """``n`` one-turn conversations (``answers`` replaces the answer of conversation k, e.g. a malformed one)."""
    items = []
    for k in range(n):
        name = f"{k:012d}.jpg"
        write_jpeg(root / "train2017" / name, _color(k + 3), size=(8, 8))
        answer = (answers or {}).get(k, f"It shows a {WORDS[k % len(WORDS)]}.")
        items.append(
            {
                "id": f"{k:012d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the picture?"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    write_json(root / "llava_instruct_150k.json", items)
    return root


def vqav2_train(root: Path, n_images: int = 6, per_image: int = 2) -> Path:
    """``n_images`` x ``per_image`` questions of the ``train2014`` split, every one with 10 answers."""
    return layouts.vqav2(
        root, n_images, per_image, split="train2014", first_id=300, first_color=5, question="What is shown {j}?"
    )


def coco_train(root: Path, n_images: int = 8) -> Path:
    """``n_images`` training images with five captions each, in ``annotations/captions_train2014.json``."""
    images, annotations = [], []
    for k in range(n_images):
        image_id = 700 + k
        name = f"COCO_train2014_{image_id:012d}.jpg"
        write_jpeg(root / "train2014" / name, _color(k + 17), size=(8, 8))
        images.append({"id": image_id, "file_name": name, "width": 8, "height": 8})
        annotations += [{"id": image_id * 10 + j, "image_id": image_id, "caption": _caption(k, j)} for j in range(5)]
    write_json(root / "annotations" / "captions_train2014.json", {"images": images, "annotations": annotations})
    return root
