"""VQAv2 from the official JSON files and from Hugging Face Parquet / save_to_disk layouts."""

from __future__ import annotations

import json
import sys

import pytest

from narrowgate.data import Skipped, VQAExample, iter_images, load_vqav2, load_vqav2_hf
from tests.data.helpers import CORRUPT_BYTES, jpeg_bytes, require_pyarrow, write_jpeg, write_json

IMAGE_IDS = [42, 73, 1000, 262148]


def _answers(word, qid):
    return [{"answer": word if k < 7 else "other", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]


@pytest.fixture
def vqa_root(tmp_path):
    """Official layout: questions + annotations JSON and val2014/ COCO images; one corrupt, one missing."""
    root = tmp_path / "vqav2"
    questions, annotations = [], []
    for k, image_id in enumerate(IMAGE_IDS):
        for j in range(2):
            qid = image_id * 1000 + j
            questions.append({"image_id": image_id, "question": f"What is {k}-{j}?", "question_id": qid})
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "answers": _answers(f"thing{k}{j}", qid),
                    "multiple_choice_answer": f"thing{k}{j}",
                    "question_type": "what is",
                    "answer_type": "other",
                }
            )
    write_json(
        root / "v2_OpenEnded_mscoco_val2014_questions.json",
        {
            "info": {},
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "data_subtype": "val2014",
            "questions": questions,
        },
    )
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations, "data_subtype": "val2014"})
    for image_id in IMAGE_IDS[:2]:
        write_jpeg(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    (root / "val2014" / f"COCO_val2014_{IMAGE_IDS[2]:012d}.jpg").write_bytes(CORRUPT_BYTES)
    return root


def test_official_layout_fields(vqa_root):
    examples = load_vqav2(vqa_root)
    assert len(examples) == 8
    assert all(isinstance(e, VQAExample) for e in examples)
    by_id = {e.id: e for e in examples}
    e = by_id["73001"]
    assert e.question == "What is 1-1?"
    assert e.answers == ("thing11",) * 7 + ("other",) * 3
    assert e.image_id == "73"
    assert e.image_path == vqa_root / "val2014" / "COCO_val2014_000000000073.jpg"
    assert e.meta["multiple_choice_answer"] == "thing11"
    assert by_id["262148000"].image_path.name == "COCO_val2014_000000262148.jpg"


def test_official_layout_bad_images_are_skipped_with_reasons(vqa_root):
    skipped: list[Skipped] = []
    loaded = list(iter_images(load_vqav2(vqa_root), skipped))
    assert sorted(e.id for e, _ in loaded) == ["42000", "42001", "73000", "73001"]
    reasons = {s.id: s.reason for s in skipped}
    assert set(reasons) == {"1000000", "1000001", "262148000", "262148001"}
    assert reasons["1000000"].startswith("corrupt image")
    assert reasons["262148000"].startswith("missing image")


def test_explicit_paths_and_no_annotations(vqa_root, tmp_path):
    images = vqa_root / "val2014"
    examples = load_vqav2(questions=vqa_root / "v2_OpenEnded_mscoco_val2014_questions.json", image_dir=images)
    assert len(examples) == 8 and all(e.answers == () for e in examples)
    renamed = tmp_path / "plain"
    write_jpeg(renamed / "000000000042.jpg")
    custom = load_vqav2(
        questions=vqa_root / "v2_OpenEnded_mscoco_val2014_questions.json",
        image_dir=renamed,
        image_name="{image_id:012d}.jpg",
    )
    assert {e.id: e for e in custom}["42000"].load_image().size == (12, 10)


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="question file"):
        load_vqav2(tmp_path)
    with pytest.raises(ValueError):
        load_vqav2()


def test_sampling_is_seeded(vqa_root):
    a = [e.id for e in load_vqav2(vqa_root, n=3, seed=1)]
    assert a == [e.id for e in load_vqav2(vqa_root, n=3, seed=1)]
    assert len(a) == 3
    others = {tuple(e.id for e in load_vqav2(vqa_root, n=3, seed=s)) for s in range(2, 8)}
    assert any(set(o) != set(a) for o in others)


def _hf_rows():
    rows = []
    for k in range(6):
        image = {"bytes": jpeg_bytes(size=(8 + k, 8)), "path": f"COCO_val2014_{k:012d}.jpg"}
        if k == 4:
            image = {"bytes": CORRUPT_BYTES, "path": None}
        if k == 5:
            image = {"bytes": None, "path": "images/nonexistent.jpg"}
        rows.append(
            {
                "question_id": 500 + k,
                "question": f"How many {k}?",
                "answers": [{"answer": str(k), "answer_confidence": "yes", "answer_id": a} for a in range(10)],
                "image_id": 900 + k,
                "multiple_choice_answer": str(k),
                "image": image,
            }
        )
    return rows


def test_hf_parquet_layout(tmp_path):
    pa, pq = require_pyarrow()
    root = tmp_path / "hf"
    (root / "data").mkdir(parents=True)
    table = pa.Table.from_pylist(_hf_rows())
    pq.write_table(table, root / "data" / "validation-00000-of-00001.parquet", row_group_size=2)
    train = pa.Table.from_pylist([dict(_hf_rows()[0], question_id=999)])
    pq.write_table(train, root / "data" / "train-00000-of-00001.parquet")

    examples = load_vqav2_hf(root, split="validation")
    assert sorted(e.id for e in examples) == [str(500 + k) for k in range(6)]
    e = {x.id: x for x in examples}["503"]
    assert e.question == "How many 3?" and e.answers == ("3",) * 10 and e.image_id == "903"
    assert e.load_image().size == (11, 8)
    skipped: list[Skipped] = []
    loaded = list(iter_images(examples, skipped))
    assert len(loaded) == 4
    reasons = {s.id: s.reason for s in skipped}
    assert reasons["504"].startswith("corrupt image")
    assert reasons["505"].startswith("missing image")

    assert len(load_vqav2_hf(root)) == 7
    assert len(load_vqav2_hf(root, split="train")) == 1
    with pytest.raises(FileNotFoundError):
        load_vqav2_hf(root, split="test")
    picked = load_vqav2_hf(root / "data" / "validation-00000-of-00001.parquet", n=3, seed=5)
    assert [x.id for x in picked] == [x.id for x in load_vqav2_hf(root, split="validation", n=3, seed=5)]
    for x in picked:
        if x.id not in ("504", "505"):
            assert x.load_image().size == (8 + int(x.id) - 500, 8)


def test_hf_save_to_disk_layout_with_string_answers(tmp_path):
    pa, _ = require_pyarrow()
    root = tmp_path / "saved"
    split_dir = root / "validation"
    split_dir.mkdir(parents=True)
    write_json(root / "dataset_dict.json", {"splits": ["validation"]})
    write_json(split_dir / "state.json", {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    write_json(split_dir / "dataset_info.json", {})
    rows = [
        {"question": f"q{k}?", "answers": [f"a{k}"] * 10, "image": {"bytes": jpeg_bytes(size=(5, 5 + k)), "path": None}}
        for k in range(3)
    ]
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(split_dir / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)

    examples = load_vqav2_hf(root)
    assert [e.id for e in examples] == ["row-0", "row-1", "row-2"]
    assert examples[2].answers == ("a2",) * 10 and examples[2].image_id is None
    assert examples[2].load_image().size == (5, 7)
    assert len(load_vqav2_hf(split_dir)) == 3
    with pytest.raises(ValueError, match="not in"):
        load_vqav2_hf(root, split="train")


def test_hf_dict_of_lists_answers(tmp_path):
    pa, pq = require_pyarrow()
    rows = [{"question_id": 1, "question": "q?", "answers": {"answer": ["x"] * 10, "answer_id": list(range(10))}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "one.parquet")
    (e,) = load_vqav2_hf(tmp_path / "one.parquet")
    assert e.answers == ("x",) * 10
    assert list(iter_images([e], skipped := [])) == [] and skipped[0].reason == "no image source"


def test_hf_without_pyarrow_says_so(tmp_path, monkeypatch):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="needs a working pyarrow"):
        load_vqav2_hf(tmp_path)


def test_question_file_is_plain_json(vqa_root):
    doc = json.loads((vqa_root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    assert set(doc["questions"][0]) == {"image_id", "question", "question_id"}
