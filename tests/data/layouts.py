"""Miniature copies of the paper's datasets in their distributed layouts, with tiny images.

- ImageNet: ``train/<wnid>/<wnid>_<k>.JPEG`` and ``val/<wnid>/ILSVRC2012_val_<k>.JPEG`` for the
  paper's 100 animal classes and the 16 other classes of its patching pairs.
- VQAv2: the official questions/annotations JSONs and COCO ``val2014/`` images.
- VQAv2 as a Hugging Face Parquet copy: ``data/validation-00000-of-00001.parquet`` with embedded images.
- COCO: the Karpathy split file ``dataset_coco.json`` with ``val2014/`` images, or the official
  ``annotations/captions_val2014.json`` with ``val2014/`` beside ``annotations/``.
- Flickr30k: ``results_20130124.token`` and ``flickr30k-images/``.
- LLaVA-Instruct-150K: ``llava_instruct_150k.json`` with COCO ``train2017/`` images.
"""

from __future__ import annotations

from pathlib import Path

from narrowgate.data import known_classes
from tests.data.helpers import write_jpeg, write_json

WORDS = ("dog", "cat", "bird", "fish", "horse", "red", "blue", "circle", "square", "picture")


def _color(k: int) -> tuple[int, int, int]:
    return (37 * k % 256, 91 * k % 256, 173 * k % 256)


def imagenet(root: Path, train: int = 2, val: int = 1) -> Path:
    """``train`` images per class in ``train/`` and ``val`` in ``val/``, for every class the paper names."""
    for i, c in enumerate(known_classes()):
        for k in range(train):
            write_jpeg(root / "train" / c.wnid / f"{c.wnid}_{k}.JPEG", _color(i * 7 + k), size=(8, 8))
        for k in range(val):
            write_jpeg(root / "val" / c.wnid / f"ILSVRC2012_val_{i:05d}{k}.JPEG", _color(i * 5 + k + 3), size=(8, 8))
    return root


def _caption(k: int, j: int) -> str:
    return f"a {WORDS[k % len(WORDS)]} and a {WORDS[(k + j) % len(WORDS)]} in the picture"


def vqav2(
    root: Path,
    n_images: int = 4,
    per_image: int = 2,
    *,
    split: str = "val2014",
    first_id: int = 100,
    first_color: int = 0,
    question: str = "What is in the picture {j}?",
) -> Path:
    """``n_images`` x ``per_image`` questions of ``split``, every one with 10 answers (VQAv2's file layout)."""
    questions, annotations = [], []
    for k in range(n_images):
        image_id = first_id + k
        write_jpeg(root / split / f"COCO_{split}_{image_id:012d}.jpg", _color(k + first_color), size=(8, 8))
        for j in range(per_image):
            qid = image_id * 10 + j
            answer = WORDS[(k + j) % len(WORDS)]
            questions.append({"image_id": image_id, "question": question.format(j=j), "question_id": qid})
            annotations.append(
                {
                    "image_id": image_id,
                    "question_id": qid,
                    "multiple_choice_answer": answer,
                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": a + 1} for a in range(10)],
                    "answer_type": "other",
                    "question_type": "what is",
                }
            )
    write_json(
        root / f"v2_OpenEnded_mscoco_{split}_questions.json",
        {"questions": questions, "data_subtype": split, "data_type": "mscoco", "task_type": "Open-Ended"},
    )
    write_json(root / f"v2_mscoco_{split}_annotations.json", {"annotations": annotations, "data_subtype": split})
    return root


def coco_karpathy(root: Path, n_test: int = 4, n_train: int = 2) -> Path:
    images = []
    for k in range(n_test + n_train):
        cocoid = 500 + k
        name = f"COCO_val2014_{cocoid:012d}.jpg"
        write_jpeg(root / "val2014" / name, _color(k + 11), size=(8, 8))
        images.append(
            {
                "filepath": "val2014",
                "filename": name,
                "cocoid": cocoid,
                "imgid": k,
                "split": "test" if k < n_test else "train",
                "sentences": [{"raw": _caption(k, j), "tokens": _caption(k, j).split()} for j in range(5)],
            }
        )
    write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})
    return root


def vqav2_parquet(root: Path, n: int = 6) -> Path:
    """The layout of a downloaded hub copy: Parquet shards under ``data/``, images embedded as bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.data.helpers import jpeg_bytes

    rows = [
        {
            "question_id": 700 + k,
            "question": f"What is in the picture {k}?",
            "answers": [
                {"answer": WORDS[k % len(WORDS)], "answer_confidence": "yes", "answer_id": a} for a in range(10)
            ],
            "image_id": 300 + k,
            "image": {"bytes": jpeg_bytes(_color(k + 3), size=(8, 8)), "path": f"COCO_val2014_{300 + k:012d}.jpg"},
        }
        for k in range(n)
    ]
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "validation-00000-of-00001.parquet")
    return root


def coco_official(root: Path, n_images: int = 4) -> Path:
    images, annotations = [], []
    for k in range(n_images):
        name = f"COCO_val2014_{600 + k:012d}.jpg"
        write_jpeg(root / "val2014" / name, _color(k + 17), size=(8, 8))
        images.append({"id": 600 + k, "file_name": name, "height": 8, "width": 8})
        annotations += [{"id": 10 * k + j, "image_id": 600 + k, "caption": _caption(k, j)} for j in range(5)]
    write_json(root / "annotations" / "captions_val2014.json", {"images": images, "annotations": annotations})
    return root


def llava_instruct(root: Path, n: int = 4) -> Path:
    items = []
    for k in range(n):
        name = f"{800 + k:012d}.jpg"
        write_jpeg(root / "train2017" / name, _color(k + 5), size=(8, 8))
        items.append(
            {
                "id": f"{800 + k:012d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\nWhat is shown in picture {k}?"},
                    {"from": "gpt", "value": f"A {WORDS[k % len(WORDS)]}."},
                ],
            }
        )
    write_json(root / "llava_instruct_150k.json", items)
    return root


def flickr30k(root: Path, n_images: int = 24) -> Path:
    lines = []
    for k in range(n_images):
        name = f"{1000000 + k}.jpg"
        write_jpeg(root / "flickr30k-images" / name, _color(k + 29), size=(8, 8))
        lines += [f"{name}#{j}\t{_caption(k, j)} ." for j in range(5)]
    (root / "results_20130124.token").write_text("\n".join(lines) + "\n")
    return root
