"""Chance levels: exact on hand-computed cases and against independent references."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from narrowgate.metrics import cider, cider_chance, neighborhood_overlap, overlap_chance, vqa_accuracy, vqa_chance


def test_overlap_chance_equals_the_overlap_of_every_other_point():
    """With k = N - 1 every point's neighbours are all the others, whatever the representation: the overlap is
    then exactly the random-neighbour chance, which gives an independent reference."""
    rng = np.random.default_rng(0)
    labels = list(rng.choice(["a", "b", "c"], size=23, p=[0.5, 0.3, 0.2]))
    x = rng.normal(size=(23, 5))
    assert overlap_chance(labels) == pytest.approx(neighborhood_overlap(x, labels, k=22), abs=1e-12)
    assert overlap_chance(["a", "a", "b"]) == pytest.approx(1 / 3)
    assert overlap_chance(["a"]) == 0.0


def test_vqa_chance_is_the_mean_over_every_pairing_within_a_question():
    answers = {1: ["red"] * 10, 2: ["blue"] * 10, 3: ["red"] * 10, 4: ["circle"] * 10}
    groups = {1: "color", 2: "color", 3: "color", 4: "shape"}
    preds = {1: "red", 2: "blue", 3: "red", 4: "circle"}
    # Brute force: each example against every other prediction of its group (4 is alone: against all others).
    expected = []
    for k in answers:
        others = [j for j in answers if j != k and (groups[j] == groups[k] or k == 4)]
        expected.append(np.mean([vqa_accuracy(preds[j], answers[k]) for j in others]))
    assert vqa_chance(preds, answers, groups) == pytest.approx(np.mean(expected))
    # A model answering without looking (one constant answer) scores exactly its chance.
    constant = {k: "red" for k in answers}
    baseline = np.mean([vqa_accuracy("red", answers[k]) for k in answers])
    assert vqa_chance(constant, answers, {k: "q" for k in answers}) == pytest.approx(baseline)


def test_vqa_chance_matches_a_random_shuffle_in_expectation():
    rng = random.Random(0)
    keys = list(range(40))
    answers = {k: [rng.choice("abc")] * 10 for k in keys}
    preds = {k: answers[k][0] if rng.random() < 0.8 else rng.choice("abc") for k in keys}
    groups = dict.fromkeys(keys, "q")
    exact = vqa_chance(preds, answers, groups)
    # every derangement-free pairing: mean over all ordered pairs (i != j)
    pairs = [vqa_accuracy(preds[j], answers[i]) for i, j in itertools.permutations(keys, 2)]
    assert exact == pytest.approx(np.mean(pairs))


def test_cider_chance_scores_the_captions_given_to_other_images():
    refs = {
        i: [f"a {c} {s}", f"there is a {c} {s}"] for i, (c, s) in enumerate(itertools.product("rgb", ["dog", "cat"]))
    }
    preds = {i: r[0] for i, r in refs.items()}  # a captioner reading every image correctly
    chance = cider_chance(preds, refs, seed=3, tokenize="ptb")
    assert chance < cider(preds, refs)[0] / 2
    keys = sorted(preds, key=str)
    order = list(range(len(keys)))
    random.Random(3).shuffle(order)
    moved = {keys[order[i]]: preds[keys[order[(i + 1) % len(keys)]]] for i in range(len(keys))}
    assert chance == pytest.approx(cider(moved, refs)[0])
    assert all(moved[k] != preds[k] for k in keys)  # every caption lands on another image
