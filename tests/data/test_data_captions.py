"""COCO (official and Karpathy) and Flickr30k (Karpathy and .token) captions, and modality-gap text."""

from __future__ import annotations

import pytest

from narrowgate.data import (
    CaptionExample,
    Skipped,
    caption_text,
    iter_images,
    load_coco_captions,
    load_coco_karpathy,
    load_flickr30k,
)
from tests.data.helpers import CORRUPT_BYTES, write_jpeg, write_json


def _coco_name(image_id, split="val2014"):
    return f"COCO_{split}_{image_id:012d}.jpg"


@pytest.fixture
def coco_root(tmp_path):
    """COCO layout: annotations/captions_val2014.json, val2014/ images (one corrupt, one missing)."""
    root = tmp_path / "coco"
    ids = [391895, 522418, 184613, 318219, 554625]
    images = [{"id": i, "file_name": _coco_name(i), "height": 10, "width": 12} for i in ids]
    images.append({"id": 999, "file_name": _coco_name(999), "height": 1, "width": 1})
    annotations = []
    for k, i in enumerate(ids):
        for j in reversed(range(5)):
            annotations.append({"image_id": i, "id": 10 * k + j, "caption": f" caption {j} of {i}. "})
    write_json(root / "annotations" / "captions_val2014.json", {"images": images, "annotations": annotations})
    for i in ids[:3]:
        write_jpeg(root / "val2014" / _coco_name(i))
    (root / "val2014" / _coco_name(ids[3])).write_bytes(CORRUPT_BYTES)
    return root


def test_coco_official_captions(coco_root):
    examples = load_coco_captions(coco_root / "annotations" / "captions_val2014.json")
    assert sorted(e.id for e in examples) == sorted(["391895", "522418", "184613", "318219", "554625"])
    e = {x.id: x for x in examples}["522418"]
    assert isinstance(e, CaptionExample)
    assert e.references == tuple(f"caption {j} of 522418." for j in range(5))
    assert e.image_path == coco_root / "val2014" / _coco_name(522418)
    skipped: list[Skipped] = []
    loaded = list(iter_images(examples, skipped))
    assert len(loaded) == 3
    assert {s.id: s.reason.split(":")[0] for s in skipped} == {"318219": "corrupt image", "554625": "missing image"}


def test_coco_official_explicit_image_dir_and_errors(coco_root, tmp_path):
    ann = coco_root / "annotations" / "captions_val2014.json"
    other = tmp_path / "elsewhere"
    write_jpeg(other / _coco_name(554625))
    examples = load_coco_captions(ann, image_dir=other, n=5)
    assert {e.id: e for e in examples}["554625"].load_image().size == (12, 10)
    lonely = write_json(tmp_path / "alone" / "captions_val2014.json", {"images": [], "annotations": []})
    with pytest.raises(FileNotFoundError, match="pass it explicitly"):
        load_coco_captions(lonely)


def _karpathy_coco(root):
    images = []
    for k, (split, cocoid) in enumerate(
        [("test", 1), ("test", 2), ("test", 3), ("val", 4), ("train", 5), ("restval", 6), ("test", 7)]
    ):
        folder = "train2014" if split == "train" else "val2014"
        images.append(
            {
                "filepath": folder,
                "filename": _coco_name(cocoid, folder),
                "imgid": k,
                "split": split,
                "cocoid": cocoid,
                "sentences": [
                    {"raw": f"Sentence {j} for {cocoid}.", "tokens": ["sentence"], "imgid": k} for j in range(5)
                ],
            }
        )
    return write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})


def test_coco_karpathy_split(tmp_path):
    root = tmp_path / "coco"
    path = _karpathy_coco(root)
    for cocoid in (1, 2, 4, 6):
        write_jpeg(root / "val2014" / _coco_name(cocoid))
    (root / "val2014" / _coco_name(3)).write_bytes(CORRUPT_BYTES)

    test = load_coco_karpathy(path)
    assert sorted(e.id for e in test) == ["1", "2", "3", "7"]
    e = {x.id: x for x in test}["2"]
    assert e.references == tuple(f"Sentence {j} for 2." for j in range(5))
    assert e.image_path == root / "val2014" / _coco_name(2)
    skipped: list[Skipped] = []
    assert sorted(x.id for x, _ in iter_images(test, skipped)) == ["1", "2"]
    assert sorted(s.id for s in skipped) == ["3", "7"]

    assert [x.id for x in load_coco_karpathy(path, split="val")] == ["4"]
    assert sorted(x.id for x in load_coco_karpathy(path, image_root=root, split=("train", "restval"))) == ["5", "6"]
    with pytest.raises(ValueError, match="unknown Karpathy split"):
        load_coco_karpathy(path, split="testing")
    assert len(load_coco_karpathy(path, n=2, seed=3)) == 2


def test_coco_karpathy_needs_image_root(tmp_path):
    path = _karpathy_coco(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="pass image_root"):
        load_coco_karpathy(path)


@pytest.fixture
def flickr_root(tmp_path):
    """Flickr30k: dataset_flickr30k.json, results_20130124.token, flickr30k-images/ (one corrupt, one missing)."""
    root = tmp_path / "flickr30k"
    names = ["1000092795", "10002456", "1000268201", "1000344755", "1000366164"]
    splits = ["test", "test", "test", "train", "val"]
    images = [
        {
            "filename": f"{n}.jpg",
            "imgid": k,
            "split": s,
            "sentences": [{"raw": f"{n} says {j} .", "tokens": []} for j in range(5)],
        }
        for k, (n, s) in enumerate(zip(names, splits))
    ]
    write_json(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    lines = [f"{n}.jpg#{j}\t{n} says {j} ." for n in names for j in (3, 0, 4, 1, 2)]
    (root / "results_20130124.token").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for n in names[:2] + names[3:]:
        write_jpeg(root / "flickr30k-images" / f"{n}.jpg")
    (root / "flickr30k-images" / f"{names[1]}.jpg").write_bytes(CORRUPT_BYTES)
    return root


def test_flickr_karpathy(flickr_root):
    test = load_flickr30k(flickr_root / "dataset_flickr30k.json")
    assert sorted(e.id for e in test) == ["1000092795", "10002456", "1000268201"]
    e = {x.id: x for x in test}["1000092795"]
    assert e.references == tuple(f"1000092795 says {j} ." for j in range(5))
    assert e.image_path == flickr_root / "flickr30k-images" / "1000092795.jpg"
    skipped: list[Skipped] = []
    assert [x.id for x, _ in iter_images(test, skipped)] == ["1000092795"]
    assert {s.id: s.reason.split(":")[0] for s in skipped} == {
        "10002456": "corrupt image",
        "1000268201": "missing image",
    }
    assert [x.id for x in load_flickr30k(flickr_root / "dataset_flickr30k.json", split="val")] == ["1000366164"]


def test_flickr_token_file(flickr_root, tmp_path):
    examples = load_flickr30k(flickr_root / "results_20130124.token")
    assert len(examples) == 5
    e = {x.id: x for x in examples}["1000344755"]
    assert e.references == tuple(f"1000344755 says {j} ." for j in range(5))
    assert e.load_image().size == (12, 10)
    with pytest.raises(ValueError, match="no splits"):
        load_flickr30k(flickr_root / "results_20130124.token", split="test")
    bad = tmp_path / "bad.token"
    bad.write_text("no tab here\n")
    with pytest.raises(ValueError, match="bad.token:1"):
        load_flickr30k(bad, image_dir=flickr_root / "flickr30k-images")


def test_flickr_explicit_image_dir(flickr_root, tmp_path):
    other = tmp_path / "imgs"
    write_jpeg(other / "1000268201.jpg", size=(3, 3))
    examples = load_flickr30k(flickr_root / "dataset_flickr30k.json", image_dir=other)
    assert {e.id: e for e in examples}["1000268201"].load_image().size == (3, 3)
    lonely = write_json(tmp_path / "x" / "y" / "dataset_flickr30k.json", {"images": []})
    with pytest.raises(FileNotFoundError):
        load_flickr30k(lonely)


def test_flickr_sampling_is_seeded(flickr_root):
    path = flickr_root / "results_20130124.token"
    a = [e.id for e in load_flickr30k(path, n=3, seed=11)]
    assert a == [e.id for e in load_flickr30k(path, n=3, seed=11)]
    assert len(set(a)) == 3


def test_modality_gap_text(flickr_root):
    examples = load_flickr30k(flickr_root / "results_20130124.token")
    e = {x.id: x for x in examples}["1000344755"]
    assert caption_text(e) == " ".join(f"1000344755 says {j} ." for j in range(5))
    assert all(caption_text(x) == " ".join(c.strip() for c in x.references) for x in examples)
