"""Two images, one question about one of them: scores against separate stock forwards with the [EOI]s swapped by plain
hooks and knockouts by the float64 eager reference; pairing; aggregation against hand computation; refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import narrowgate as ng
from narrowgate.analyses import EXPERIMENTS
from narrowgate.analyses.two_images import KNOCKOUTS, TwoImages, TwoImagesConfig, question
from narrowgate.data.prompts import name_ids, resize
from narrowgate.parsing import parse_image_size
from narrowgate.runner import run, settings_of
from narrowgate.store import Shard
from tests.engine import reference


def _cfg(ckpt, out, **extra):
    return dict(model=str(ckpt), data="synthetic", out=str(out), n_per_class=4, progress=False, batch_size=2) | extra


def _scores(model, inputs: dict, names: list[list[int]], hooks=(), edits=None) -> list[float]:
    """Summed log-probs of each name after the prompt, one stock forward per name (the name appended by hand)."""
    out = []
    T = inputs["input_ids"].shape[1]
    for ids in names:
        x = dict(inputs)
        x["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids[:-1]], dtype=torch.long)], 1)
        x["attention_mask"] = torch.ones_like(x["input_ids"])
        handles = [layer.register_forward_pre_hook(fn, with_kwargs=True) for layer, fn in hooks]
        if edits is not None:
            mode, src, text_from = edits
            tgt = torch.zeros_like(x["input_ids"], dtype=torch.bool)
            tgt[:, text_from:] = True  # the text: every position after the last image
            mask = torch.zeros_like(tgt)
            mask[0, src] = True
            reference.EDITS[mode] = [(None, tgt, mask)]
        try:
            with torch.no_grad():
                logits = model(**x, use_cache=False).logits[0]
        finally:
            reference.EDITS.update(mask=[], zero=[])
            for h in handles:
                h.remove()
        logp = torch.log_softmax(logits.double(), -1)
        out.append(float(sum(logp[T - 1 + j, t] for j, t in enumerate(ids))))
    return out


def test_scores_equal_separate_stock_forwards(checkpoint_dir, loaded, tmp_path):
    """Every unit's baseline, [EOI] knockout and [EOI] swap scores equal stock forwards of the two-image prompt
    plus each name: the swap by a plain pre-hook exchanging the two [EOI] hidden states of the unswapped run, the
    knockout by stock eager attention with the entries zeroed by hand; positions found from the token ids alone."""
    ckpt = checkpoint_dir("chameleon")
    vlm = loaded("chameleon")
    store = run(EXPERIMENTS["two-images"](), _cfg(ckpt, tmp_path / "run"), vlm=vlm, command=["t"])
    rows, arrays = store.records().rows, store.records().arrays
    assert len(rows) == 12 and rows["asked"].tolist()[:4] == [1, 2, 1, 2]
    assert (rows["asked_label"] != rows["other_label"]).all()
    exp = TwoImages()
    cfg = settings_of(exp, _cfg(ckpt, tmp_path / "run"))
    examples = {e.id: e for e in exp.examples(cfg)}
    stock = reference.reference_model(ckpt, vlm.family.decoder_layers)
    layers = vlm.family.decoder_layers(stock)
    tok = vlm.family.tokenizer
    L = vlm.n_layers
    size = parse_image_size(json.loads((store.path / "manifest.json").read_text())["config"]["image_size"])
    for i in (0, 1):
        row = rows.iloc[i]
        a = int(row["asked"])
        pair = [examples[row["first_image"]], examples[row["second_image"]]]
        prompt = question(cfg).format(which=("first", "second")[a - 1])
        inputs = {
            k: v
            for k, v in vlm.family.encode(
                [resize(pair[0].load_image(), size), resize(pair[1].load_image(), size)],
                [vlm.family.prompt(prompt, True, ("image", "image"))],
                None,
            ).items()
        }
        eois = torch.nonzero(inputs["input_ids"][0] == vlm.family.eoi_id).flatten()
        assert len(eois) == 2
        names = [name_ids(tok, pair[a - 1].word), name_ids(tok, pair[2 - a].word)]
        want = _scores(stock, inputs, names)
        np.testing.assert_allclose([arrays["score_asked"][i, 0], arrays["score_other"][i, 0]], want, atol=2e-4)
        knocked = _scores(stock, inputs, names, edits=("zero", eois[a - 1 : a], int(eois[-1]) + 1))
        column = 1 + 2 * KNOCKOUTS.index("eoi") + (a - 1)
        np.testing.assert_allclose(
            [arrays["score_asked"][i, column], arrays["score_other"][i, column]], knocked, atol=2e-4
        )
        with torch.no_grad():
            hs = stock(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        for l in range(1, L):
            one, two = hs[l][0, eois[0]].clone(), hs[l][0, eois[1]].clone()

            def swap(module, args, kwargs, one=one, two=two, eois=eois):
                h = (args[0] if args else kwargs["hidden_states"]).clone()
                h[0, eois[0]], h[0, eois[1]] = two, one
                return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

            swapped = _scores(stock, inputs, names, hooks=[(layers[l], swap)])
            column = 1 + 2 * len(KNOCKOUTS) + l
            got = [arrays["score_asked"][i, column], arrays["score_other"][i, column]]
            np.testing.assert_allclose(got, swapped, atol=2e-4, err_msg=f"swap@{l}")
            assert not np.allclose(swapped, want, atol=1e-4), f"swap@{l} changes nothing"
    tables = store.tables()
    assert set(tables) >= {"two_images", "swap", "summary"} and len(tables["swap"]) == L
    assert (store.path / "figures" / "two_images.png").stat().st_size > 1000


def _planted(margins: np.ndarray, asked: list[int], kl: np.ndarray | None = None) -> Shard:
    """Records whose asked-minus-other score per condition is ``margins`` [U, C] (other scored 0)."""
    rows = pd.DataFrame({"example_id": [f"u{i}" for i in range(len(asked))], "asked": asked})
    kl = np.zeros_like(margins) if kl is None else kl
    return Shard(
        rows,
        {
            "score_asked": margins.astype(np.float32),
            "score_other": np.zeros_like(margins, dtype=np.float32),
            "kl": kl.astype(np.float32),
        },
    )


def test_aggregate_equals_a_hand_computation():
    """Four units, asked 1, 2, 1, 2, a model with L = 2: conditions baseline, eoi@1, eoi@2, image@1, image@2, swap@0,
    swap@1. The asked image's [EOI] is read from the unit's own asked number."""
    base = np.array([2.0, 1.0, 3.0, -1.0])
    eoi1 = np.array([0.0, 1.0, 1.0, -1.0])  # units 0, 2 ask image 1: their margin drops to 0 and 1
    eoi2 = np.array([2.0, -1.0, 3.0, 1.0])  # units 1, 3 ask image 2: 1 -> -1, -1 -> 1
    image1, image2 = base - 0.5, base + 0.25
    swap0, swap1 = base, -base
    margins = np.stack([base, eoi1, eoi2, image1, image2, swap0, swap1], 1)
    cfg = TwoImagesConfig(mode="zero", span="single")
    # Four pairs cannot show a preference above chance (0.75 +- 0.22): no shares, whatever the knockouts do.
    s = TwoImages().aggregate(_planted(margins, [1, 2, 1, 2]), cfg, {"n_layers": 2})["summary"].iloc[0]
    assert np.isnan(s["eoi_asked_margin_removed"]) and "not clearly above chance" in s["verdict"]
    margins = np.tile(margins, (8, 1))  # the same four pairs eight times: 0.75 +- 0.08, above chance
    tables = TwoImages().aggregate(_planted(margins, [1, 2, 1, 2] * 8), cfg, {"n_layers": 2})
    k = tables["two_images"].set_index("condition")
    assert k.loc["baseline", "accuracy"] == 0.75 and k.loc["baseline", "margin"] == pytest.approx(1.25)
    asked = k.loc["eoi of the asked image -> text"]
    # asked margins: unit0 eoi@1 0, unit1 eoi@2 -1, unit2 eoi@1 1, unit3 eoi@2 1 -> mean 0.25, change -1.0
    assert asked["margin"] == pytest.approx(0.25) and asked["margin_change"] == pytest.approx(-1.0)
    assert asked["accuracy"] == 0.5 and asked["flip_rate"] == pytest.approx(0.5)  # units 1 and 3 change sign
    other = k.loc["eoi of the other image -> text"]  # unit0 eoi@2 2, unit1 eoi@1 1, unit2 eoi@2 3, unit3 eoi@1 -1
    assert other["margin_change"] == pytest.approx(0.0) and other["flip_rate"] == 0
    assert k.loc["image of the asked image -> text", "margin_change"] == pytest.approx(-0.5 * 0.5 + 0.25 * 0.5)
    swap = tables["swap"].set_index("resid")
    assert swap.loc[0, "flip_rate"] == 0 and swap.loc[1, "flip_rate"] == 1 and swap.loc[1, "accuracy"] == 0.25
    s = tables["summary"].iloc[0]
    assert s["eoi_asked_margin_removed"] == pytest.approx(1.0 / 1.25) and s["eoi_other_margin_removed"] == 0
    assert s["swap_best_resid"] == 1 and s["swap_flip_rate"] == 1
    assert s["verdict"].startswith("knocking out the asked image's [EOI] removes 80% of the margin")
    # A baseline at chance: no share of its margin is given, and the verdict says why.
    flat = margins.copy()
    flat[:, 0] = [1.0, -1.0, 1.0, -1.0] * 8
    s = TwoImages().aggregate(_planted(flat, [1, 2, 1, 2] * 8), cfg, {"n_layers": 2})["summary"].iloc[0]
    assert np.isnan(s["eoi_asked_margin_removed"]) and s["verdict"].startswith("no verdict: the baseline prefers")


def test_pairs_and_refusals(checkpoint_dir, tmp_path):
    exp = TwoImages()
    cfg = settings_of(exp, _cfg(checkpoint_dir("chameleon"), tmp_path / "x"))
    units = exp.units(exp.examples(cfg), cfg)
    assert len(units) == 12 and all(u.examples[0].label != u.examples[1].label for u in units)
    assert [u.meta["asked"] for u in units] == [1, 2] * 6 and len({u.id for u in units}) == 12
    with pytest.raises(ng.NarrowgateError, match="no \\{which\\}"):
        run(exp, _cfg(checkpoint_dir("chameleon"), tmp_path / "q", question="Which one is a"))
    with pytest.raises(ng.NarrowgateError, match="at least 10"):
        run(exp, _cfg(checkpoint_dir("chameleon"), tmp_path / "n", n_per_class=3))
    assert not (tmp_path / "q").exists() and not (tmp_path / "n").exists()
