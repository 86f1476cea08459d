"""The shipped animal classes and patching pairs, and ImageNet class-folder loading."""

from __future__ import annotations

import json
import re

import pytest

from narrowgate.data import (
    Skipped,
    animal_classes,
    by_label,
    class_pairs,
    class_word,
    iter_images,
    known_classes,
    load_imagenet,
)
from narrowgate.data.imagenet import RESOURCE
from tests.data.helpers import CORRUPT_BYTES, write_jpeg

#: ImageNet-1k's animal classes run from tench (class 0) to puffer (class 397); the paper's
#: list contains both ends.
FIRST_ANIMAL, LAST_ANIMAL = "n01440764", "n02655020"


def test_resource_has_the_papers_100_animal_classes():
    classes = animal_classes()
    assert len(classes) == 100
    assert len({c.wnid for c in classes}) == 100
    assert len({c.synset for c in classes}) == 100
    for c in classes:
        assert re.fullmatch(r"n\d{8}", c.wnid), c
        assert FIRST_ANIMAL <= c.wnid <= LAST_ANIMAL, c
        assert c.synset.rsplit(".n.", 1)[0].replace("_", " ") == c.word.lower(), c
    assert min(c.wnid for c in classes) == FIRST_ANIMAL and max(c.wnid for c in classes) == LAST_ANIMAL
    assert classes[0].synset == "staffordshire_bullterrier.n.01" and classes[-1].synset == "kelpie.n.02"


@pytest.mark.parametrize(
    ("wnid", "word"),
    [
        ("n01440764", "tench"),
        ("n02093256", "Staffordshire bullterrier"),
        ("n01518878", "ostrich"),
        ("n02112137", "chow"),
        ("n02437312", "Arabian camel"),
        ("n02655020", "puffer"),
        ("n02110185", "Siberian husky"),
    ],
)
def test_class_words_are_first_wordnet_lemmas(wnid, word):
    assert class_word(wnid) == word


def test_resource_pairs():
    pairs = class_pairs()
    assert len(pairs) == 10
    members = [c for pair in pairs for c in pair]
    assert len({c.wnid for c in members}) == 20
    known = {c.wnid for c in known_classes()}
    for c in members:
        assert c.wnid in known and re.fullmatch(r"n\d{8}", c.wnid)
        assert FIRST_ANIMAL <= c.wnid <= LAST_ANIMAL, c
    assert (pairs[0][0].synset, pairs[0][1].synset) == ("american_alligator.n.01", "arabian_camel.n.01")
    in_the_100 = {c.wnid for c in animal_classes()} & {c.wnid for c in members}
    assert {class_word(w) for w in in_the_100} == {"Arabian camel", "bee eater", "macaw", "tailed frog"}
    assert len(known_classes()) == len({c.wnid for c in known_classes()}) == 116
    with pytest.raises(KeyError):
        class_word("n03000134")


def test_resource_file_is_packaged_json():
    doc = json.loads(RESOURCE.read_text())
    assert set(doc) >= {"animals", "pair_classes", "pairs", "source"}


def _tree(root, spec, order=1):
    """``spec``: {wnid: number of images}; files are created in the given order (1 or -1)."""
    for wnid, count in sorted(spec.items())[::order]:
        for k in range(count)[::order]:
            write_jpeg(root / wnid / f"{wnid}_{k}.JPEG", size=(4 + k, 4))
    return root


SPEC = {"n01440764": 6, "n02093256": 5, "n03000134": 4, "n01518878": 3}


def test_load_imagenet_tree(tmp_path):
    _tree(tmp_path / "val", SPEC)
    (tmp_path / "val" / "n01440764" / "notes.txt").write_text("not an image")
    examples = load_imagenet(tmp_path)
    assert len(examples) == 18
    e = examples[0]
    assert (e.id, e.label, e.word) == ("n01440764/n01440764_0", "n01440764", "tench")
    assert e.image_path == tmp_path / "val" / "n01440764" / "n01440764_0.JPEG"
    assert e.load_image().size == (4, 4)
    assert {x.word for x in examples if x.label == "n03000134"} == {"n03000134"}
    assert len(load_imagenet(tmp_path / "val", split=None)) == 18


def test_load_imagenet_class_restrictions_and_words_file(tmp_path):
    _tree(tmp_path / "train", {c.wnid: 2 for c in animal_classes()} | {"n03000134": 2, "n02110185": 1})
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn03000134 chainlink fence\n")
    animals = load_imagenet(tmp_path, "train", classes="animals", n_per_class=1)
    assert len(animals) == 100 and {e.label for e in animals} == {c.wnid for c in animal_classes()}
    assert all(e.word == class_word(e.label) for e in animals)
    chosen = load_imagenet(tmp_path, "train", classes=["n03000134", "n02110185"])
    assert {e.word for e in chosen} == {"chainlink fence", "Siberian husky"}
    with pytest.raises(FileNotFoundError, match="no folder"):
        load_imagenet(tmp_path, "train", classes="pairs")
    with pytest.raises(ValueError):
        load_imagenet(tmp_path, "train", classes="dogs")
    with pytest.raises(FileNotFoundError):
        load_imagenet(tmp_path, "val")


def test_per_class_sampling_is_seeded_and_listing_order_free(tmp_path):
    a = load_imagenet(_tree(tmp_path / "a" / "val", SPEC, order=1).parent, n_per_class=2, seed=3)
    b = load_imagenet(_tree(tmp_path / "b" / "val", SPEC, order=-1).parent, n_per_class=2, seed=3)
    assert [e.id for e in a] == [e.id for e in b]
    assert {k: len(v) for k, v in by_label(a).items()} == {w: 2 for w in SPEC}
    seeds = {tuple(e.id for e in load_imagenet(tmp_path / "a", n_per_class=2, seed=s)) for s in range(4, 10)}
    assert len(seeds) > 1
    animals = ["n01440764", "n02093256", "n01518878"]
    picked = load_imagenet(tmp_path / "a", classes=animals, n_per_class=100, n=5, seed=3)
    assert len(picked) == 5 and {e.label for e in picked} <= set(animals)
    assert [e.id for e in picked] == [
        e.id for e in load_imagenet(tmp_path / "b", classes=animals, n_per_class=100, n=5, seed=3)
    ]


def test_bad_imagenet_images_are_reported(tmp_path):
    _tree(tmp_path / "val", {"n01440764": 3})
    (tmp_path / "val" / "n01440764" / "n01440764_1.JPEG").write_bytes(CORRUPT_BYTES)
    examples = load_imagenet(tmp_path)
    (tmp_path / "val" / "n01440764" / "n01440764_2.JPEG").unlink()
    skipped: list[Skipped] = []
    assert [e.id for e, _ in iter_images(examples, skipped)] == ["n01440764/n01440764_0"]
    assert [(s.id, s.reason.split(":")[0]) for s in skipped] == [
        ("n01440764/n01440764_1", "corrupt image"),
        ("n01440764/n01440764_2", "missing image"),
    ]
