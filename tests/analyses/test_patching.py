"""Patching: whole-name class scores (against a direct forward), pair sampling, direction, ImageNet pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from narrowgate import Capture, Patch
from narrowgate.analyses import EXPERIMENTS
from narrowgate.analyses.patching import pair_order, patch_conditions
from narrowgate.data import class_pairs, tasks
from narrowgate.data.prompts import name_ids, name_scores
from narrowgate.runner import run
from tests.fixtures.common import images

PROMPT = "This animal is a"


def _reference(vlm, image, names, patches=()):
    """Summed log-probs of each name by one full forward per name on prompt + name (no shared prefix, no extend)."""
    batch = vlm.prepare([image], [PROMPT])
    out = []
    for ids in names:
        inputs = dict(batch.inputs)
        inputs["input_ids"] = torch.cat([batch.input_ids, torch.tensor([ids[:-1]], dtype=torch.long)], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if patches:
            from narrowgate.batch import Batch

            ext = Batch(inputs=inputs, layouts=batch.layouts, first=batch.first, bos_id=batch.bos_id)
            logits = vlm.forward(ext, patches=patches).logits[0]
        else:
            with torch.no_grad():
                logits = vlm.model(**inputs).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        start = batch.length - 1
        out.append(float(sum(logp[start + j, t] for j, t in enumerate(ids))))
    return out


def test_whole_name_scores_match_a_direct_forward_and_differ_within_every_pair(loaded):
    """Byte-level BPE (the tiny Chameleon's): every pair name is several tokens; scores are whole-name sums."""
    vlm = loaded("chameleon")
    tok = vlm.family.tokenizer
    img, donor_img = images(2, seed=3)
    pairs = class_pairs()
    donor = vlm.forward(vlm.prepare([donor_img], [PROMPT]), capture=Capture("eoi")).residuals["eoi"]
    conds = patch_conditions(donor.repeat(len(pairs), 1, 1), vlm.n_layers, "single")[:2]  # baseline, patch@0
    batch = vlm.prepare([img] * len(pairs), [PROMPT] * len(pairs))
    base = [name_ids(tok, b.word) for b, _ in pairs]
    target = [name_ids(tok, t.word) for _, t in pairs]
    assert all(len(ids) > 1 for ids in base + target) and all(b != t for b, t in zip(base, target))
    s_base, _ = name_scores(vlm, batch, conds, base)
    s_target, _ = name_scores(vlm, batch, conds, target)
    for c in conds:
        assert (s_base[c.name] != s_target[c.name]).all(), c.name
    # Independent reference on the pairs whose names share their first token (and on the first pair).
    shared = [i for i in range(len(pairs)) if base[i][0] == target[i][0]]
    assert shared, "the first-token rule would tie these pairs (e.g. ' g' for green mamba / grey whale)"
    for i in sorted({0, shared[0]}):
        for c in conds:
            patches = tuple(Patch("eoi", p.resid, p.value[:1]) for p in c.patches)
            want = _reference(vlm, img, [base[i], target[i]], patches)
            np.testing.assert_allclose([s_base[c.name][i], s_target[c.name][i]], want, rtol=1e-4, atol=1e-4)


def test_name_scores_single_token_equal_next_token_log_probs(loaded):
    vlm = loaded("chameleon")
    batch = vlm.prepare(images(2), [PROMPT] * 2)
    ids = [[5], [7]]
    scores, first = name_scores(vlm, batch, {"baseline": {}}, ids)
    logits = vlm.forward_conditions(batch, {"baseline": {}})["baseline"].last_logits
    logp = torch.log_softmax(logits, -1)
    np.testing.assert_allclose(scores["baseline"].numpy(), [logp[0, 5], logp[1, 7]], rtol=1e-5)
    np.testing.assert_allclose(first["baseline"].numpy(), logits.numpy(), rtol=1e-5, atol=1e-5)


def test_paper_direction_takes_the_first_printed_class_as_donor():
    printed = [(a.wnid, b.wnid) for a, b in class_pairs()]
    assert pair_order("imagenet") == [(b, a) for a, b in printed]
    assert len(pair_order("imagenet")) == 10


def _cfg(checkpoint_dir, tmp_path, **kw):
    return dict(
        model=str(checkpoint_dir("chameleon")),
        data="synthetic",
        out=str(tmp_path / "run"),
        progress=False,
        batch_size=4,
        **kw,
    )


def test_patching_samples_per_pair_class_whatever_n_and_says_so(checkpoint_dir, loaded, tmp_path):
    vlm = loaded("chameleon")
    with pytest.raises(tasks.DataError, match="--n-per-class"):
        run(EXPERIMENTS["patching"](), _cfg(checkpoint_dir, tmp_path, n=6), vlm=vlm, command=["x"])
    store = run(
        EXPERIMENTS["patching"](),
        _cfg(checkpoint_dir, tmp_path / "b", n_per_class=2, direction="both"),
        vlm=vlm,
        command=["x"],
    )
    pairs = store.tables()["patching_pairs"]
    n_pairs = len(pair_order("synthetic"))
    assert len(pairs) == 2 * n_pairs and (pairs["n"] == 2).all()
    assert set(store.tables()["patching"]["direction"]) == {"both"}
    forward = {p for p in pairs["pair"]}
    assert all(f"{t}<-{b}" in forward for b, t in (p.split("<-") for p in forward))


def test_prompt_presets_reproduce_the_published_settings():
    from narrowgate.data.prompts import CLASS, VQA, preset, resolve

    assert preset("class_patching", "chameleon", 48, "imagenet").endswith(". This animal is a")  # Chameleon-34B
    assert preset("class_patching", "chameleon", 32, "imagenet") == CLASS["imagenet"]  # Chameleon-7B
    # the authors' Chameleon-34B long prompt on every ImageNet input (cross-attention, overlap, ImageNet ablation)
    assert preset("class", "chameleon", 48, "imagenet") == preset("class_patching", "chameleon", 48, "imagenet")
    assert preset("class", "chameleon", 32, "imagenet") == CLASS["imagenet"]  # Sec. 4.2/4.3 prompt
    assert preset("class", "chameleon", 48, "synthetic") == CLASS["synthetic"]
    assert preset("vqa", "chameleon", 32, "vqav2") == VQA + " Answer:" and preset("vqa", "llava", 32, "vqav2") == VQA
    cfg = resolve({"data": "imagenet", "prompt": "mine"}, ("class_patching",), "chameleon", 48)
    assert cfg["prompt"] == "mine"


def test_flip_rate_counts_sign_changes_of_the_class_score_difference(checkpoint_dir, loaded, tmp_path):
    """The authors' criterion: sign(score(target) - score(base)) patched vs unpatched; with no ties it is exactly
    whether 'target beats base' changed, and a pair the target wins unpatched counts only when the patch flips it."""
    vlm = loaded("chameleon")
    store = run(EXPERIMENTS["patching"](), _cfg(checkpoint_dir, tmp_path, n_per_class=2), vlm=vlm, command=["x"])
    arrays, table = store.records().arrays, store.tables()["patching"]
    acc, before = arrays["accuracy"], arrays["accuracy_unpatched"]
    assert (arrays["score_target_unpatched"] > arrays["score_base_unpatched"]).astype(np.float32).tolist() == list(
        before
    )
    np.testing.assert_allclose(table["flip_rate"], (acc != before[:, None]).mean(0))
    assert list(table["relative_depth"]) == [l / vlm.n_layers for l in range(vlm.n_layers)]  # resid / L
