"""Chance levels of the task scores: what a model that ignores the image would score.

A knockout's score relative to the baseline means something only when the baseline is above
chance; these give that chance for each task score, from the run's own predictions or labels:

- VQA accuracy: each example scored against the *other* examples' predictions to the same
  question (VQAv2's ``question_type`` when the data has it, else the question text), averaged
  exactly over every such pairing. A model that answers without looking scores this in expectation
  (a constant answer scores exactly it); a model that reads the image scores above it.
- CIDEr-D: the same captions assigned to other images (one seeded derangement), as the organisms'
  cards measure it.
- Neighbourhood overlap with labels: the share of same-label points among random neighbours,
  ``sum_c n_c (n_c - 1) / (N (N - 1))`` (exact).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence

from .cider import cider
from .vqa import accuracy_of_normalized, normalize_vqa_answer

__all__ = ["cider_chance", "overlap_chance", "vqa_chance"]


def vqa_chance(
    predictions: Mapping[Hashable, str],
    answers: Mapping[Hashable, Sequence[str]],
    groups: Mapping[Hashable, Hashable],
) -> float:
    """Mean VQAv2 accuracy of other examples' predictions (same ``groups`` key) on each example's answers.

    Examples alone in their group are paired with every other example instead; with fewer than two
    examples in all there is nothing to pair and the chance is 0.
    """
    keys = list(predictions)
    if len(keys) < 2:
        return 0.0
    norm_pred = {k: normalize_vqa_answer(predictions[k]) for k in keys}
    by_group: dict = defaultdict(list)
    for k in keys:
        by_group[groups[k]].append(k)
    singles = [k for members in by_group.values() if len(members) == 1 for k in members]
    pools = [members for members in by_group.values() if len(members) > 1]
    everyone = Counter(norm_pred.values())
    total = 0.0
    for members in pools + [[k] for k in singles]:
        counts = Counter(norm_pred[k] for k in members) if len(members) > 1 else everyone
        size = (len(members) if len(members) > 1 else len(keys)) - 1
        for k in members:
            refs = [normalize_vqa_answer(a) for a in answers[k]]
            score = {p: accuracy_of_normalized(p, refs) for p in counts}
            total += (sum(c * score[p] for p, c in counts.items()) - score[norm_pred[k]]) / size
    return total / len(keys)


def cider_chance(
    candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *, seed: int, tokenize: str
) -> float:
    """Corpus CIDEr-D of the candidates given to other images (a seeded derangement); 0 below two captions."""
    keys = sorted(candidates, key=str)
    if len(keys) < 2:
        return 0.0
    order = list(range(len(keys)))
    random.Random(seed).shuffle(order)
    moved = {keys[order[i]]: candidates[keys[order[(i + 1) % len(keys)]]] for i in range(len(keys))}
    return cider(moved, {k: references[k] for k in keys}, tokenize=tokenize)[0]


def overlap_chance(labels: Sequence[Hashable]) -> float:
    """Expected neighbourhood overlap when neighbours are drawn at random: same-label share among others."""
    n = len(labels)
    if n < 2:
        return 0.0
    return sum(c * (c - 1) for c in Counter(labels).values()) / (n * (n - 1))
