"""Issue 23: dataset files as users really have them, damaged: one line naming the file and the fix, or
the bad entry as that example's failure record; never a traceback, never the prompt "None"; and no
image is opened outside the data directory (items 5 and 13, "errors a person can act on")."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from narrowgate.cli import app
from narrowgate.data import BadExample, base, load_coco_karpathy, load_vqav2, load_vqav2_hf, tasks
from narrowgate.data.llava_instruct import load_llava_instruct
from narrowgate.errors import DataError
from narrowgate.store import RunStore
from tests.analyses.test_refusals import _one_line_refusal
from tests.data import layouts
from tests.data.helpers import require_pyarrow, write_jpeg

runner = CliRunner()
QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"


def _edit(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _cli(data, root, out, *extra):
    args = ["run", "ablation", "--model", "native", "--data", data, "--data-dir", str(root), "--out", str(out)]
    return runner.invoke(app, [*args, "--max-new-tokens", "2", "--quiet", "--allow-fewer", *extra])


# --- item 5: a question that is not text is that example's failure, never the prompt "None" ----------------
def test_questions_that_are_not_text_become_failure_records(tmp_path):
    root = layouts.vqav2(tmp_path / "vqa", n_images=2, per_image=3)

    def spoil(doc):
        doc["questions"][0]["question"] = None
        doc["questions"][1]["question"] = 12345
        doc["questions"][2]["question"] = ["what", "is", "it"]
        doc["questions"][3]["image_id"] = "abc"

    _edit(root / QUESTIONS, spoil)
    out = tmp_path / "run"
    result = _cli("vqav2", root, out)
    # The native organism may answer these questions at chance: the run then stops after writing its records.
    at_chance = result.exit_code == 1 and "at or below chance" in result.output
    assert result.exit_code == 0 or at_chance, result.output
    store = RunStore(out)
    reasons = dict(zip(store.failures()["example_id"], store.failures()["reason"]))
    assert reasons == {
        "1000": "1000: question is null, not text",
        "1001": "1001: question is the number 12345, not text",
        "1002": "1002: question is a list, not text",
        "1010": "1010: image_id is the text 'abc', not a COCO image number",
    }
    assert sorted(store.records().rows["example_id"]) == ["1011", "1012"]
    if not at_chance:
        assert set(store.tables()["ablation"]["n"]) == {2}


# --- malformed files: one line naming the file (through the command line, before anything is written) ------
def _vqa(tmp_path):
    return layouts.vqav2(tmp_path / "vqa", n_images=2, per_image=2)


def _coco(tmp_path):
    return layouts.coco_karpathy(tmp_path / "coco", n_test=3, n_train=0)


def _flickr(tmp_path):
    return layouts.flickr30k(tmp_path / "flickr", n_images=3)


def _token(root):
    return root / "results_20130124.token"


CASES = {
    "questions JSON is a list": (
        "vqav2",
        _vqa,
        lambda r: (r / QUESTIONS).write_text("[1, 2]"),
        "is not a VQAv2 questions file: expected an object with a list 'questions', found a list",
    ),
    "questions entry is not an object": (
        "vqav2",
        _vqa,
        lambda r: _edit(r / QUESTIONS, lambda d: d["questions"].append("why?")),
        "entry 4 of questions is the text 'why?', not an object",
    ),
    "duplicate question ids": (
        "vqav2",
        _vqa,
        lambda r: _edit(r / QUESTIONS, lambda d: d["questions"][1].update(question_id=1000)),
        "has two entries with question_id '1000'",
    ),
    "question id missing": (
        "vqav2",
        _vqa,
        lambda r: _edit(r / QUESTIONS, lambda d: d["questions"][1].pop("question_id")),
        "entry 1 has question_id null; expected a number or a name",
    ),
    "data_subtype escapes": (
        "vqav2",
        _vqa,
        lambda r: _edit(r / QUESTIONS, lambda d: d.update(data_subtype="../../etc")),
        "data_subtype is the text '../../etc'; expected a split name",
    ),
    "annotations are not a list": (
        "vqav2",
        _vqa,
        lambda r: (r / "v2_mscoco_val2014_annotations.json").write_text('{"annotations": null}'),
        "is not a VQAv2 annotations file: expected an object with a list 'annotations', found 'annotations' is null",
    ),
    "Karpathy images missing": (
        "coco",
        _coco,
        lambda r: (r / "dataset_coco.json").write_text('{"imgs": []}'),
        "is not a Karpathy split file: expected an object with a list 'images'",
    ),
    "deeply nested JSON": (
        "coco",
        _coco,
        lambda r: (r / "dataset_coco.json").write_text("[" * 100000 + "]" * 100000),
        "nested too deeply",
    ),
    "token file in Latin-1": (
        "flickr30k",
        _flickr,
        lambda r: _token(r).write_bytes("1000000.jpg#0\tun caf\xe9\n".encode("latin-1")),
        "results_20130124.token:1 is not UTF-8 text (byte 0xe9)",
    ),
    "token line without its tab": (
        "flickr30k",
        _flickr,
        lambda r: _token(r).write_text("1000000.jpg#0\ta dog\n1000000.jpg#1 a cat\n"),
        "results_20130124.token:2: expected '<file>#<n><TAB><caption>', got '1000000.jpg#1 a cat'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_dataset_file_is_one_line_and_nothing_is_written(case, tmp_path):
    data, build, spoil, message = CASES[case]
    root = build(tmp_path)
    spoil(root)
    result = _cli(data, root, tmp_path / "run")
    _one_line_refusal(result, message)
    assert not (tmp_path / "run").exists()


def test_a_corrupt_parquet_copy_is_one_line(tmp_path):
    require_pyarrow()
    root = layouts.vqav2_parquet(tmp_path / "hf")
    shard = root / "data" / "validation-00000-of-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # an interrupted download
    result = _cli("vqav2", root, tmp_path / "run")
    _one_line_refusal(result, "validation-00000-of-00001.parquet is not a readable Parquet/Arrow file")
    assert "download it again" in result.output and not (tmp_path / "run").exists()


def test_captions_that_are_null_fail_their_example_only(tmp_path):
    root = layouts.coco_karpathy(tmp_path / "coco", n_test=3, n_train=0)
    _edit(root / "dataset_coco.json", lambda d: d["images"][0].update(sentences=None))
    _edit(root / "dataset_coco.json", lambda d: d["images"][1]["sentences"][2].update(raw=None))
    by_id = {e.id: e for e in load_coco_karpathy(root / "dataset_coco.json")}
    assert by_id["500"].defect == "captions are null, not a list"
    assert by_id["501"].defect == "a caption is null, not text"
    assert by_id["502"].defect is None and len(by_id["502"].references) == 5
    with pytest.raises(BadExample, match="500: captions are null"):
        by_id["500"].load_image()


def test_llava_instruct_of_the_wrong_shape_or_a_run_directory(tmp_path):
    root = layouts.llava_instruct(tmp_path / "llava")
    examples = load_llava_instruct(root)
    assert [e.prompt for e in examples][:1] == ["What is shown in picture 0?"] and examples[0].load_image()
    (root / "llava_instruct_150k.json").write_text('{"conversations": []}')
    with pytest.raises(DataError, match="is not LLaVA-Instruct data .*: expected a JSON list, found an object"):
        load_llava_instruct(root)
    (root / "llava_instruct_150k.json").write_text('[{"id": 1, "image": "x.jpg", "conversations": 5}, 7]')
    with pytest.raises(DataError, match="entry 1 of the list is the number 7, not an object"):
        load_llava_instruct(root)
    run = tmp_path / "run"
    (run / "records").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="is a narrowgate run directory, not LLaVA-Instruct data"):
        load_llava_instruct(run)
    item = {
        "id": 9,
        "image": "x.jpg",
        "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}],
    }
    (root / "llava_instruct_150k.json").write_text(json.dumps([item]))
    (bad,) = load_llava_instruct(root)
    assert bad.id == "9-0" and bad.defect == "the question is null, not text"


def test_vqa_questions_without_answers_are_refused_before_anything_runs(tmp_path):
    root = _vqa(tmp_path)
    (root / "v2_mscoco_val2014_annotations.json").unlink()
    assert all(e.answers == () for e in load_vqav2(root))  # the loader reads test-dev style questions
    result = _cli("vqav2", root, tmp_path / "run")
    _one_line_refusal(result, "None of the 4 VQA questions from")
    assert "annotations" in result.output and not (tmp_path / "run").exists()


def test_gate_scan_scoring_vqa_without_answers_is_refused_before_anything_runs(tmp_path):
    root = layouts.vqav2(tmp_path / "vqa", n_images=4, per_image=3)
    (root / "v2_mscoco_val2014_annotations.json").unlink()
    args = ["run", "gate-scan", "--model", "native", "--data", "vqav2", "--data-dir", str(root)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run"), "--score", "--quiet", "--allow-fewer"])
    _one_line_refusal(result, "None of the 12 VQA questions from")
    assert not (tmp_path / "run").exists()


# --- item 13: image paths named in annotation files stay inside the data directory -----------------------
def test_image_paths_that_escape_the_data_directory_are_never_opened(tmp_path, monkeypatch):
    secret = write_jpeg(tmp_path / "outside" / "secret.jpg")  # a real image: only the rule can refuse it
    root = layouts.coco_karpathy(tmp_path / "coco", n_test=4, n_train=0)
    elsewhere = write_jpeg(tmp_path / "elsewhere" / "linked.jpg", color=(1, 2, 3), size=(9, 7))
    os.symlink(elsewhere, root / "val2014" / "linked.jpg")  # a link the user made inside: fine

    def spoil(doc):
        doc["images"][0].update(filename="../../outside/secret.jpg")
        doc["images"][1].update(filepath="/", filename=str(secret).lstrip("/"))
        doc["images"][2].update(filename="linked.jpg")

    _edit(root / "dataset_coco.json", spoil)
    opened = []
    real_open = base.Image.open
    monkeypatch.setattr(base.Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    by_id = {e.id: e for e in tasks.load("coco", "captions", root, seed=0)}
    for bad in ("500", "501"):
        assert by_id[bad].image_path is None and "is not a file inside" in by_id[bad].defect
        with pytest.raises(BadExample, match="narrowgate opens only images inside the data directory"):
            by_id[bad].load_image()
    assert by_id["502"].load_image().size == (9, 7)
    assert opened == [str(root / "val2014" / "linked.jpg")]


def test_hf_image_paths_outside_the_copy_fail_their_example(tmp_path):
    pa, pq = require_pyarrow()
    write_jpeg(tmp_path / "outside.jpg")
    write_jpeg(tmp_path / "hf" / "images" / "inside.jpg", size=(5, 6))
    rows = [
        {
            "question_id": 1,
            "question": "q?",
            "answers": ["a"],
            "image": {"bytes": None, "path": str(tmp_path / "outside.jpg")},
        },
        {"question_id": 2, "question": "q?", "answers": ["a"], "image": {"bytes": None, "path": "../outside.jpg"}},
        {"question_id": 3, "question": "q?", "answers": ["a"], "image": {"bytes": None, "path": "images/inside.jpg"}},
        {
            "question_id": 4,
            "question": "q?",
            "answers": ["a"],
            "image": {"bytes": None, "path": str(tmp_path / "hf" / "images" / "inside.jpg")},
        },
    ]
    (tmp_path / "hf").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hf" / "train.parquet")
    by_id = {e.id: e for e in load_vqav2_hf(tmp_path / "hf")}
    assert "is not a file inside" in by_id["1"].defect and "is not a file inside" in by_id["2"].defect
    assert by_id["3"].load_image().size == by_id["4"].load_image().size == (5, 6)
