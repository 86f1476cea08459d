"""Scores shared by experiments: task scores of generated text with their standard errors and chance level,
KL divergence of next-token distributions, and Spearman rank correlation.

They live here, not in an experiment, so experiments never import each other (ablation and the gate scan both
score generated text; the gate scan and two-images both measure KL).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from .chance import cider_chance, vqa_chance
from .cider import cider
from .vqa import vqa_accuracy

#: Example id -> its example (`narrowgate.data.VQAExample` with ``answers``, or a caption example with ``references``).
Examples = Mapping[str, Any]


def text_metric(task: str, tokenize: str) -> str:
    """The name of the score of generated answers (vqa) or captions."""
    return "vqa_accuracy" if task == "vqa" else ("cider" if tokenize == "ptb" else "cider (raw strings)")


def text_score(task: str, preds: Mapping[str, str], examples: Examples, tokenize: str) -> float:
    """VQA accuracy (mean over examples) or corpus CIDEr-D of ``preds`` (example id -> generated text)."""
    return float(np.mean(text_scores(task, preds, examples, tokenize)))


def text_scores(task: str, preds: Mapping[str, str], examples: Examples, tokenize: str) -> np.ndarray:
    """Per-example VQA accuracy or per-image CIDEr-D of ``preds``, in ``preds``' order; their mean is the
    task's score (corpus CIDEr-D is the mean of the per-image scores, with IDF from the whole set)."""
    if task == "vqa":
        return np.array([vqa_accuracy(p, examples[i].answers) for i, p in preds.items()], dtype=np.float64)
    per = cider(dict(preds), {i: list(examples[i].references) for i in preds}, tokenize=tokenize)[1]
    return np.array([per[i] for i in preds], dtype=np.float64)


def standard_errors(per: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """Standard errors over examples of the mean of ``per`` and of its ratio to the mean of ``base``.

    The ratio's is the delta method on the paired examples: mean(per)/mean(base) - R is, to first order,
    the mean of per_i - R base_i divided by mean(base). NaN below two examples, or for a zero baseline.
    """
    n = len(per)
    if n < 2:
        return float("nan"), float("nan")
    se = float(np.std(per, ddof=1) / np.sqrt(n))
    mean_base = float(np.mean(base))
    if mean_base == 0:
        return se, float("nan")
    ratio = float(np.mean(per)) / mean_base
    return se, float(np.std(per - ratio * base, ddof=1) / np.sqrt(n) / abs(mean_base))


def text_chance(task: str, preds: Mapping[str, str], examples: Examples, tokenize: str, seed: int) -> float:
    """What the baseline's own answers score on other images (`narrowgate.metrics.chance`): the image-blind
    level a score must beat to say the model reads the image."""
    texts: dict[Hashable, str] = {i: t for i, t in preds.items()}
    if task == "vqa":
        groups: dict[Hashable, Hashable] = {
            i: examples[i].meta.get("question_type") or examples[i].question for i in preds
        }
        return vqa_chance(texts, {i: examples[i].answers for i in preds}, groups)
    return cider_chance(texts, {i: list(examples[i].references) for i in preds}, seed=seed, tokenize=tokenize)


def kl(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(base) || softmax(logits)) per row, in nats, computed in float64 (float32 log-probabilities cancel to
    a noise floor of ~1e-7 nats between two nearly equal distributions, e.g. the same condition in two passes), and
    returned as float32."""
    lp, lq = torch.log_softmax(base_logits.double(), -1), torch.log_softmax(logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp(min=0.0).float()


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
