"""Issue 23: every dataset reader, fed random values in its real files (or random files), either reads or
raises `DataError` with one line; never another exception. What it reads is usable: each example is either
well formed (text where text belongs, its image inside the data directory) or defective with a reason, and
loading its image raises nothing but `BadExample`.

Each case starts from a miniature copy in the dataset's real layout (tests/data/layouts.py) and replaces a
random part of one of its files (any node of the JSON, a line of the token file, a Parquet column, the
whole file) with a random value, or adds random files to an ImageNet tree.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from narrowgate.data import (
    BadExample,
    CaptionExample,
    ClassExample,
    VQAExample,
    load_coco_captions,
    load_coco_karpathy,
    load_flickr30k,
    load_imagenet,
    load_vqav2,
    load_vqav2_hf,
)
from narrowgate.data.llava_instruct import InstructExample, load_llava_instruct
from narrowgate.errors import DataError
from tests.data import layouts
from tests.data.helpers import CORRUPT_BYTES, jpeg_bytes, require_pyarrow

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
names = st.sampled_from(["../../../etc/shadow", "/etc/passwd", "a/../../b.jpg", "C:\\x.jpg", "", "x.jpg", "\x00"])
json_values = st.recursive(
    scalars | names,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8,
)
raw_files = st.binary(max_size=64) | st.sampled_from(
    [b"", b"[]", b"{}", b"null", b"[1,2]", b'{"images": 3}', CORRUPT_BYTES]
)


def _paths(doc, prefix=()):
    """Every node of a JSON document, as the keys leading to it."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for k, v in enumerate(doc[:3]):
            yield from _paths(v, (*prefix, k))


def _mutate(data, doc):
    """``doc`` with one node replaced by a random value or removed (drawn with hypothesis' ``data``)."""
    path = data.draw(st.sampled_from(list(_paths(doc))), label="node")
    if not path:
        return data.draw(json_values, label="document")
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and data.draw(st.booleans(), label="remove"):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values, label="value")
    return doc


def _spoil(data, path: Path) -> None:
    """Write random bytes over ``path``, or replace one random node of its JSON."""
    if data.draw(st.integers(0, 4), label="whole file") == 0:
        path.write_bytes(data.draw(raw_files, label="bytes"))
    else:
        path.write_text(json.dumps(_mutate(data, json.loads(path.read_text()))))


def _check(read, root: Path, kind) -> None:
    """``read()`` reads usable examples or raises `DataError` with one line."""
    try:
        examples = read()
    except DataError as e:
        assert "\n" not in str(e) and str(e)
        return
    for e in examples:
        assert isinstance(e, kind) and isinstance(e.id, str) and e.id
        if e.image_path is not None:  # no symbolic links in these copies: the path itself must lie inside
            assert Path(e.image_path).resolve().is_relative_to(root.resolve()), e.image_path
        if e.defect is not None:
            assert isinstance(e.defect, str) and e.defect
            with pytest.raises(BadExample):
                e.load_image()
            continue
        if isinstance(e, VQAExample):
            assert isinstance(e.question, str) and all(isinstance(a, str) for a in e.answers)
        if isinstance(e, CaptionExample):
            assert e.references and all(isinstance(r, str) for r in e.references)
        if isinstance(e, InstructExample):
            assert isinstance(e.prompt, str) and isinstance(e.answer, str)
        with contextlib.suppress(BadExample):  # a missing or corrupt image is that example's failure
            e.load_image()


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    return {
        "vqav2": layouts.vqav2(base / "vqav2", n_images=2, per_image=2),
        "coco": layouts.coco_official(base / "coco", n_images=3),
        "karpathy": layouts.coco_karpathy(base / "karpathy", n_test=3, n_train=1),
        "flickr": layouts.flickr30k(base / "flickr", n_images=3),
        "llava": layouts.llava_instruct(base / "llava", n=3),
    }


@contextlib.contextmanager
def _fresh(originals, name):
    """A throw-away copy of the miniature ``name`` layout."""
    with tempfile.TemporaryDirectory(prefix="ng-reader-") as tmp:
        yield Path(shutil.copytree(originals[name], Path(tmp) / name))


@contextlib.contextmanager
def _empty():
    with tempfile.TemporaryDirectory(prefix="ng-reader-") as tmp:
        yield Path(tmp)


@PROPERTY
@given(data=st.data())
def test_vqav2_json(originals, data):
    with _fresh(originals, "vqav2") as root:
        name = data.draw(
            st.sampled_from(["v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"])
        )
        _spoil(data, root / name)
        _check(lambda: load_vqav2(root), root, VQAExample)


@PROPERTY
@given(data=st.data())
def test_coco_official_captions(originals, data):
    with _fresh(originals, "coco") as root:
        _spoil(data, root / "annotations" / "captions_val2014.json")
        _check(lambda: load_coco_captions(root / "annotations" / "captions_val2014.json"), root, CaptionExample)


@PROPERTY
@given(data=st.data())
def test_coco_and_flickr_karpathy(originals, data):
    with _fresh(originals, "karpathy") as root:
        _spoil(data, root / "dataset_coco.json")
        _check(lambda: load_coco_karpathy(root / "dataset_coco.json"), root, CaptionExample)
        shutil.copy(root / "dataset_coco.json", root / "dataset_flickr30k.json")
        (root / "flickr30k-images").mkdir()
        _check(lambda: load_flickr30k(root / "dataset_flickr30k.json", split="test"), root, CaptionExample)


@PROPERTY
@given(
    data=st.data(),
    lines=st.lists(
        st.text(max_size=30) | st.sampled_from(["x.jpg#0\tcap", "../a.jpg#1\tc", "\t", "#\t", "a#b\tc"]), max_size=6
    ),
    latin=st.booleans(),
)
def test_flickr_token_file(originals, data, lines, latin):
    with _fresh(originals, "flickr") as root:
        token = root / "results_20130124.token"
        keep = token.read_text().splitlines()[: data.draw(st.integers(0, 15))]
        text = "\n".join(keep + lines)
        token.write_bytes(
            text.encode("latin-1", errors="replace") if latin else text.encode("utf-8", errors="surrogatepass")
        )
        _check(lambda: load_flickr30k(token), root, CaptionExample)


@PROPERTY
@given(data=st.data())
def test_llava_instruct(originals, data):
    with _fresh(originals, "llava") as root:
        _spoil(data, root / "llava_instruct_150k.json")
        _check(lambda: load_llava_instruct(root), root, InstructExample)


@PROPERTY
@given(
    folders=st.dictionaries(
        st.sampled_from(["n01440764", "n02085620", "n99999999", "train", ".hidden", "a b"]),
        st.lists(st.sampled_from(["a.JPEG", "b.jpg", "c.png", "d.txt", "sub", "e.JPEG"]), max_size=4),
        max_size=4,
    ),
    words=st.binary(max_size=40),
    corrupt=st.booleans(),
    classes=st.sampled_from([None, "animals", "pairs", ("n01440764",)]),
)
def test_imagenet_tree(folders, words, corrupt, classes):
    with _empty() as root:
        for wnid, files in folders.items():
            (root / wnid).mkdir(exist_ok=True)
            for f in files:
                if f == "sub":
                    (root / wnid / f).mkdir(exist_ok=True)
                else:
                    (root / wnid / f).write_bytes(CORRUPT_BYTES if corrupt else jpeg_bytes(size=(4, 4)))
        (root / "synset_words.txt").write_bytes(words)
        _check(lambda: load_imagenet(root, split=None, classes=classes), root, ClassExample)


hf_values = st.none() | st.integers(-5, 2**40) | st.text(max_size=10) | st.lists(st.text(max_size=5), max_size=3)


@PROPERTY
@given(
    questions=st.lists(hf_values, min_size=1, max_size=4),
    ids=st.lists(st.none() | st.integers(0, 3), min_size=4, max_size=4)
    | st.lists(st.none() | st.text(max_size=3), min_size=4, max_size=4),
    answers=st.sampled_from([None, "yes", ["a", "b"], [{"answer": "x"}], {"answer": ["y"]}]),
    image=st.sampled_from([None, "../x.jpg", "/etc/passwd", "img.jpg", b"bytes"]),
    garbage=st.none() | raw_files,
)
def test_vqav2_parquet(questions, ids, answers, image, garbage):
    pa, pq = require_pyarrow()
    with _empty() as root:
        rows = [
            {
                "question_id": ids[k],
                "question": q,
                "answers": answers,
                "image": {
                    "bytes": image if isinstance(image, bytes) else None,
                    "path": image if isinstance(image, str) else None,
                },
            }
            for k, q in enumerate(questions)
        ]
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed kinds in one column: a Parquet file cannot hold them
            table = pa.Table.from_pylist([{**r, "question": json.dumps(r["question"])} for r in rows])
        pq.write_table(table, root / "train.parquet")
        if garbage is not None:
            (root / "train.parquet").write_bytes(garbage)
        _check(lambda: load_vqav2_hf(root), root, VQAExample)
