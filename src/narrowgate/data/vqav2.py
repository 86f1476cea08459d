"""VQAv2 questions with their 10 human answers, from the official JSON files or a Hugging Face layout.

The paper evaluates 2,000 randomly chosen validation questions; pass ``n=2000`` (seeded).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from ..errors import DataError, DataMissing
from .base import (
    DEFAULT_SEED,
    VQAExample,
    describe,
    entries,
    entry_id,
    image_in,
    read_json,
    sample,
    text_defect,
    unique,
)
from .hf import HFTable


def _first_existing(candidates: list[Path], what: str) -> Path:
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise DataMissing(f"no {what}; looked for: " + ", ".join(str(c) for c in candidates))


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

    questions = Path(questions)
    q_doc = read_json(questions)
    items = entries(q_doc, "questions", questions, "a VQAv2 questions file")
    subtype = q_doc.get("data_subtype") or split
    if not isinstance(subtype, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", subtype):
        raise DataError(f"{questions}: data_subtype is {describe(subtype)}; expected a split name such as 'val2014'.")
    if image_name is None:
        image_name = f"COCO_{subtype}_" + "{image_id:012d}.jpg"
    answers: dict[str, dict[str, Any]] = {}
    if annotations is not None:
        annotations = Path(annotations)
        what = "a VQAv2 annotations file"
        for i, ann in enumerate(entries(read_json(annotations), "annotations", annotations, what)):
            answers[entry_id(ann, "question_id", annotations, i)] = ann

    examples = []
    for i, q in enumerate(items):
        qid = entry_id(q, "question_id", questions, i)
        ann = answers.get(qid, {})
        image_id, question = q.get("image_id"), q.get("question")
        given = _answer_texts(ann.get("answers", ()))
        defect = (
            text_defect(question, "question")
            or _image_id_defect(image_id)
            or (None if isinstance(given, tuple) else given)
        )
        path = None
        if defect is None:
            assert image_id is not None  # `_image_id_defect` refuses anything but a number
            path = image_in(Path(image_dir), image_name.format(image_id=int(image_id)), questions)
        examples.append(
            VQAExample(
                id=qid,
                image_path=path,
                question=question if isinstance(question, str) else "",
                answers=given if isinstance(given, tuple) else (),
                image_id=str(image_id) if isinstance(image_id, (int, str)) else None,
                meta={k: ann[k] for k in ("multiple_choice_answer", "question_type", "answer_type") if k in ann},
                defect=defect,
            )
        )
    return sample(unique(examples, questions, "question_id"), n, seed)


def _image_id_defect(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return None
    return f"image_id is {describe(value)}, not a COCO image number"


def _answer_texts(value: Any) -> tuple[str, ...] | str:
    """The human answers as texts, or the reason they cannot be used: VQAv2's list of ``{"answer": ...}``
    objects, a list of texts, one text, or (Hugging Face) an object holding such a list."""
    if value is None:
        return ()
    if isinstance(value, dict):
        value = value.get("answer", ())
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        return f"answers are {describe(value)}, not a list"
    out = []
    for a in value:
        text = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(text, str):
            return f"an answer is {describe(text)}, not text"
        out.append(text)
    return tuple(out)


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
        raise DataError(f"no 'question' column in {path}; columns: {sorted(k for k in rows[0] if k != '_ref')}")
    refs = {}
    examples = []
    for k, row in enumerate(rows):
        qid = row.get("question_id")
        example_id = f"row-{k}" if qid is None else entry_id(row, "question_id", table.shards[row["_ref"][0]], k)
        refs[example_id] = row["_ref"]
        image_id, question = row.get("image_id"), row.get("question")
        given = _answer_texts(row.get("answers"))
        examples.append(
            VQAExample(
                id=example_id,
                question=question if isinstance(question, str) else "",
                answers=given if isinstance(given, tuple) else (),
                image_id=str(image_id) if isinstance(image_id, (int, str)) else None,
                meta={k: row[k] for k in ("multiple_choice_answer", "question_type", "answer_type") if k in row},
                defect=text_defect(question, "question") or (None if isinstance(given, tuple) else given),
            )
        )
    chosen = sample(unique(examples, path, "question_id"), n, seed)
    images = table.images([refs[e.id] for e in chosen])
    out = []
    for e in chosen:
        source = table.image_source(images[refs[e.id]])
        out.append(dataclasses.replace(e, **{k: v for k, v in source.items() if k != "defect" or e.defect is None}))
    return out
