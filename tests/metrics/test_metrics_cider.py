"""CIDEr-D via pycocoevalcap's scorer, with the pure-Python PTB tokenisation."""

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from narrowgate.metrics import cider, ptb_tokenize

REFERENCES = {
    "img1": [
        "a man riding a horse on a beach",
        "a person rides a brown horse near the ocean",
        "man on horseback at the seaside",
    ],
    "img2": ["two dogs playing in the snow", "a pair of dogs run through snow", "dogs playing outside in winter"],
    "img3": [
        "a plate of food with broccoli and rice",
        "a dinner plate with rice and vegetables",
        "broccoli and rice on a white plate",
    ],
    "img4": [
        "a red bus driving down a city street",
        "a double decker bus on the road",
        "a bus in traffic on a busy street",
    ],
}
CANDIDATES = {
    "img1": "a man riding a horse on the beach",
    "img2": "dogs playing in the snow",
    "img3": "a plate with rice and broccoli",
    "img4": "a cat sleeping on a sofa",
}


def test_matches_pycocoevalcap_on_pretokenised_text():
    # Lowercase, punctuation-free text is left unchanged by the tokeniser.
    for text in [CANDIDATES[k] for k in CANDIDATES] + [r for refs in REFERENCES.values() for r in refs]:
        assert ptb_tokenize(text) == text
    score, per_key = cider(CANDIDATES, REFERENCES)
    ref_score, ref_scores = Cider().compute_score(REFERENCES, {k: [v] for k, v in CANDIDATES.items()})
    assert score == pytest.approx(float(ref_score), abs=1e-12)
    assert list(per_key) == list(CANDIDATES)
    np.testing.assert_allclose([per_key[k] for k in REFERENCES], ref_scores, atol=1e-12)
    assert score == pytest.approx(np.mean(list(per_key.values())), abs=1e-12)


def test_tokenisation_makes_raw_text_equivalent():
    raw = {k: v.capitalize() + "." for k, v in CANDIDATES.items()}
    raw_refs = {k: [r.upper() + " !" for r in refs] for k, refs in REFERENCES.items()}
    assert cider(raw, raw_refs) == cider(CANDIDATES, REFERENCES)


def test_key_order_does_not_matter():
    reordered = {k: CANDIDATES[k] for k in reversed(list(CANDIDATES))}
    score, per_key = cider(reordered, REFERENCES)
    base_score, base = cider(CANDIDATES, REFERENCES)
    assert score == pytest.approx(base_score, abs=1e-12)
    assert per_key == pytest.approx(base, abs=1e-12)


def test_matching_caption_beats_unrelated_one():
    exact = dict(CANDIDATES, img1=REFERENCES["img1"][0])
    unrelated = dict(CANDIDATES, img1="a bowl of soup on a wooden table")
    _, good = cider(exact, REFERENCES)
    _, bad = cider(unrelated, REFERENCES)
    assert good["img1"] > 1.0 > bad["img1"]
    _, per_key = cider(CANDIDATES, REFERENCES)
    assert per_key["img4"] < min(per_key["img1"], per_key["img2"], per_key["img3"])


def test_single_image_scores_zero():
    # With one image every n-gram has idf log(1) - log(df) = 0, as in coco-caption.
    score, per_key = cider({"x": "a dog"}, {"x": ["a dog"]})
    assert score == 0.0 and per_key == {"x": 0.0}


def test_key_mismatch_and_empty_inputs_raise():
    with pytest.raises(ValueError, match="same keys"):
        cider({"a": "x", "b": "y"}, {"a": ["x"], "c": ["y"]})
    with pytest.raises(ValueError, match="at least one"):
        cider({}, {})
    with pytest.raises(ValueError, match="non-empty"):
        cider({"a": "x", "b": "y"}, {"a": ["x"], "b": []})


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A man's dog, running.", "a man 's dog running"),
        ("Don't stop (now)!", "do n't stop now"),
        ("It can't; it won't.", "it ca n't it wo n't"),
        ('The "big" black-and-white cat', "the big black-and-white cat"),
        ("1,000 mats at 10:30: a sale", "1,000 mats at 10:30 a sale"),
        ("The dogs' toys...", "the dogs toys"),
        ("'Quoted' words -- here", "quoted words here"),
        ("Mr. Smith cannot go to the U.S.", "mr. smith can not go to the u.s."),
        ("50% off, $5 each?", "50 % off $ 5 each"),
        ("a dog.\nA cat.", "a dog a cat"),
        ("I'm sure they're fine", "i 'm sure they 're fine"),
        ("3.5 meters", "3.5 meters"),
    ],
)
def test_ptb_tokenize(raw, expected):
    assert ptb_tokenize(raw) == expected


def test_raw_tokenisation_is_the_authors_variant():
    """raw keeps case and punctuation, so "A dog." no longer matches "a dog"; ptb makes them equal."""
    cands = {"a": "A dog.", "b": "two cats"}
    refs = {"a": ["a dog", "a dog"], "b": ["two cats", "two cats"]}
    ptb, _ = cider(cands, refs)
    raw, per = cider(cands, refs, tokenize="raw")
    assert ptb > raw and per["a"] == 0.0 and per["b"] > 0
    assert cider({"a": "a dog", "b": "two cats"}, refs, tokenize="raw")[0] == pytest.approx(ptb)
    with pytest.raises(ValueError, match="tokenize"):
        cider(cands, refs, tokenize="java")
