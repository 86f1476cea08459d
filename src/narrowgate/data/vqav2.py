"""VQAv2 questions with their 10 human answers, from the official JSON files or a Hugging Face layout.

The paper evaluates 2,000 randomly chosen validation questions; pass ``n=2000`` (seeded).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .base import DEFAULT_SEED, VQAExample, read_json, sample
from .hf import HFTable


def _first_existing(candidates: list[Path], what: str) -> Path:
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no {what}; looked for: " + ", ".join(str(c) for c in candidates))


def load_vqav2(
    root: str | Path | None = None,
    split: str = "val2014",
    *,
    questions: str | Path | None = None,
    annotations: str | Path | None = None,
    image_dir: str | Path | None = None,
    image_name: str | None = None,
    n: int | None = None,
    seed: int = DEFAULT_SEED,
) -> list[VQAExample]:
    """Load VQAv2 from the official files.

    ``root`` holds ``v2_OpenEnded_mscoco_{split}_questions.json``, ``v2_mscoco_{split}_annotations.json``
    and the COCO image folder ``{split}/`` (each also looked for under ``annotations/``, ``images/``);
    ``questions``, ``annotations`` and ``image_dir`` override those paths. Without annotations
    (e.g. test-dev) answers are empty. ``image_name`` is a format string with ``{image_id}``,
    by default ``COCO_{data_subtype}_{image_id:012d}.jpg``, with ``data_subtype`` read from the
    question file (falling back to ``split``). The example id is the question id.
    """
    base = Path(root) if root is not None else None
    if questions is None:
        if base is None:
            raise ValueError("pass root or questions")
        name = f"v2_OpenEnded_mscoco_{split}_questions.json"
        questions = _first_existing(
            [base / name, base / "annotations" / name, base / "questions" / name], "question file"
        )
    if annotations is None and base is not None:
        name = f"v2_mscoco_{split}_annotations.json"
        candidates = [base / name, base / "annotations" / name]
        annotations = next((c for c in candidates if c.exists()), None)
    if image_dir is None:
        if base is None:
            raise ValueError("pass root or image_dir")
        image_dir = _first_existing([base / split, base / "images" / split], "image folder")

    q_doc = read_json(Path(questions))
    subtype = q_doc.get("data_subtype") or split
    if image_name is None:
        image_name = f"COCO_{subtype}_" + "{image_id:012d}.jpg"
    answers: dict[int, dict[str, Any]] = {}
    if annotations is not None:
        for ann in read_json(Path(annotations))["annotations"]:
            answers[ann["question_id"]] = ann

    examples = []
    for q in q_doc["questions"]:
        ann = answers.get(q["question_id"], {})
        examples.append(
            VQAExample(
                id=str(q["question_id"]),
                image_path=Path(image_dir) / image_name.format(image_id=int(q["image_id"])),
                question=q["question"],
                answers=tuple(a["answer"] for a in ann.get("answers", ())),
                image_id=str(q["image_id"]),
                meta={k: ann[k] for k in ("multiple_choice_answer", "question_type", "answer_type") if k in ann},
            )
        )
    return sample(examples, n, seed)


def _answers(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, dict):
        value = value.get("answer", ())
    if isinstance(value, str):
        return (value,)
    return tuple(a["answer"] if isinstance(a, dict) else str(a) for a in value)


def load_vqav2_hf(
    path: str | Path,
    split: str | None = None,
    *,
    n: int | None = None,
    seed: int = DEFAULT_SEED,
    image_column: str = "image",
) -> list[VQAExample]:
    """Load VQAv2 from a Hugging Face layout on disk (``save_to_disk`` Arrow, or Parquet shards).

    Needs columns ``question`` and ``answers`` (a list of ``{"answer": ...}`` dicts, a list of
    strings, or a dict of lists) and an image column holding ``{"bytes", "path"}``; ``question_id``
    and ``image_id`` are used when present. The id is the question id, else ``row-<k>`` in shard
    order. Images are read from the files only for the sampled rows.
    """
    table = HFTable(path, split, image_column)
    rows = table.rows()
    if rows and "question" not in rows[0]:
        raise ValueError(f"no 'question' column in {path}; columns: {sorted(k for k in rows[0] if k != '_ref')}")
    refs = {}
    examples = []
    for k, row in enumerate(rows):
        qid = row.get("question_id")
        example_id = str(qid) if qid is not None else f"row-{k}"
        refs[example_id] = row["_ref"]
        image_id = row.get("image_id")
        examples.append(
            VQAExample(
                id=example_id,
                question=row["question"],
                answers=_answers(row.get("answers")),
                image_id=None if image_id is None else str(image_id),
                meta={k: row[k] for k in ("multiple_choice_answer", "question_type", "answer_type") if k in row},
            )
        )
    chosen = sample(examples, n, seed)
    images = table.images([refs[e.id] for e in chosen])
    return [dataclasses.replace(e, **table.image_source(images[refs[e.id]])) for e in chosen]
