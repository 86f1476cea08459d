"""The scores experiments share (`narrowgate.metrics.scores`): text scores and their standard errors, KL, Spearman.

Moved here with the scorers from the ablation and gate-scan tests (issue 28): each is checked against an
independent computation (by hand, the jackknife, corpus CIDEr-D, scipy), and the old import paths still work
with a DeprecationWarning naming the new home.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from narrowgate.data import synthetic_captions
from narrowgate.metrics import cider
from narrowgate.metrics.scores import kl, spearman, standard_errors, text_score, text_scores


def test_standard_errors_by_hand():
    per, base = np.array([1.0, 0.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0, 0.0])
    se, rse = standard_errors(per, base)
    assert se == pytest.approx(np.sqrt(1 / 3) / 2)  # sample std of 1,0,1,0 is sqrt(1/3)
    ratio = 0.5 / 0.75
    assert rse == pytest.approx(np.std(per - ratio * base, ddof=1) / 2 / 0.75)
    assert all(np.isnan(standard_errors(per[:1], base[:1])))
    rng = np.random.default_rng(0)  # the delta method agrees with the jackknife as n grows
    base = (rng.random(400) < 0.6).astype(float)
    per = base * (rng.random(400) < 0.7)
    loo = np.array([np.delete(per, i).mean() / np.delete(base, i).mean() for i in range(400)])
    assert standard_errors(per, base)[1] == pytest.approx(
        np.sqrt(399 / 400 * ((loo - loo.mean()) ** 2).sum()), rel=0.01
    )
    assert np.isnan(standard_errors(per, np.zeros(4))[1])


def test_per_image_cider_averages_to_the_corpus_score():
    examples = {e.id: e for e in synthetic_captions(6, 1)}
    preds = {i: e.references[k % 5] + (" extra words" if k % 2 else "") for k, (i, e) in enumerate(examples.items())}
    corpus = cider(preds, {i: list(e.references) for i, e in examples.items()})[0]
    assert text_scores("captions", preds, examples, "ptb").mean() == pytest.approx(corpus)


def test_text_score_is_the_mean_of_the_per_example_vqa_accuracies():
    from narrowgate.data import VQAExample

    examples = {
        "a": VQAExample(id="a", question="q", answers=("red",) * 10),
        "b": VQAExample(id="b", question="q", answers=("blue",) * 10),
    }
    assert text_scores("vqa", {"a": "red", "b": "green"}, examples, "ptb").tolist() == [1.0, 0.0]
    assert text_score("vqa", {"a": "red", "b": "green"}, examples, "ptb") == 0.5


def test_kl_agrees_with_a_float64_hand_computation():
    gen = torch.Generator().manual_seed(0)
    p, q = torch.randn(3, 50, generator=gen), torch.randn(3, 50, generator=gen)
    lp, lq = p.double().log_softmax(-1), q.double().log_softmax(-1)
    by_hand = (lp.exp() * (lp - lq)).sum(-1)
    assert torch.allclose(kl(p, q).double(), by_hand, atol=1e-6)
    assert kl(p, q).dtype == torch.float32
    assert (kl(p, p) == 0).all()  # never a negative noise floor


def test_spearman_agrees_with_scipy_and_refuses_a_constant_side():
    rng = np.random.default_rng(1)
    a, b = rng.random(30), rng.random(30)
    b[:5] = b[0]  # ties: average ranks
    assert spearman(a, b) == pytest.approx(spearmanr(a, b)[0])
    assert np.isnan(spearman(a, np.ones(30)))


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("narrowgate.analyses.ablation", "text_score"),
        ("narrowgate.analyses.ablation", "standard_errors"),
        ("narrowgate.analyses.ablation", "parse_layers"),
        ("narrowgate.analyses.gate_scan", "kl"),
        ("narrowgate.analyses.gate_scan", "spearman"),
    ],
)
def test_the_old_homes_still_import_with_a_warning(module, name):
    with pytest.warns(DeprecationWarning, match=f"{module}.{name} is deprecated"):
        old = getattr(importlib.import_module(module), name)
    new = "narrowgate.analyses.options" if name == "parse_layers" else "narrowgate.metrics.scores"
    assert old is getattr(importlib.import_module(new), name)
