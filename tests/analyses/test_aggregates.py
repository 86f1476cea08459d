"""Every experiment's aggregate against hand-computed values on planted records (a transposed or
misaligned aggregate fails these; a non-empty table does not pass them by being non-empty)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from narrowgate.analyses import EXPERIMENTS


def _records(rows: list[dict], arrays: dict | None = None):
    return SimpleNamespace(
        rows=pd.DataFrame(rows), arrays={k: np.asarray(v, dtype=np.float32) for k, v in (arrays or {}).items()}
    )


def _cfg(name: str, **kw):
    """The experiment's settings instance, as the runner hands it to every hook."""
    return EXPERIMENTS[name].config(**{"data": "synthetic", "seed": 0, **kw})


# k = 1 neighbourhoods: at SAME every point's nearest neighbour shares its label (overlap 1), at CROSS none does (0).
LABELS = ["a", "a", "b", "b"]
SAME = [[0, 0], [0, 1], [10, 0], [10, 1]]
CROSS = [[0, 0], [10, 0], [0, 1], [10, 1]]


def test_overlap_per_resid_and_role():
    eoi = np.stack([SAME, CROSS], 1)  # [N, resid, D]: resid 0 separates the classes, resid 1 mixes them
    rows = [{"example_id": str(i), "label": lab, "image_index": 31} for i, lab in enumerate(LABELS)]
    records = _records(rows, {"0:eoi": eoi, "0:image_k": eoi[:, ::-1]})
    table = EXPERIMENTS["overlap"]().aggregate(records, _cfg("overlap", k=1), {"n_layers": 1})["overlap"]
    got = {(r.role, r.resid): r.overlap for r in table.itertuples()}
    assert got == {("eoi", 0): 1.0, ("eoi", 1): 0.0, ("image[31]", 0): 0.0, ("image[31]", 1): 1.0}
    assert set(table["knockout"]) == {"none"} and (table["k"] == 1).all()


def test_ablation_classes_scores_each_condition():
    names = ["baseline", "eoi->text", "image->text", "last_image->text", "eoi->eoi+text"]
    planted = {
        "baseline": SAME,
        "eoi->text": CROSS,
        "image->text": SAME,
        "last_image->text": CROSS,
        "eoi->eoi+text": CROSS,
    }
    rows = [{"example_id": str(i), "label": lab} for i, lab in enumerate(LABELS)]
    records = _records(rows, {f"last:{n}": planted[n] for n in names})
    table = EXPERIMENTS["ablation"]().aggregate(records, _cfg("ablation", task="classes", k=1), {"n_layers": 2})
    table = table["ablation"].set_index("condition")
    assert list(table.index) == names
    assert table["score"].to_dict() == {n: 1.0 if planted[n] is SAME else 0.0 for n in names}
    assert table["relative"].to_dict() == table["score"].to_dict() and (table["metric"] == "overlap@last").all()
    assert (table["chance"] == 1 / 3).all()  # two labels of two points: a random neighbour shares one's label 1 in 3


def test_ablation_refuses_a_baseline_at_chance_instead_of_relative_scores():
    from narrowgate.errors import BaselineAtChance

    rows = [{"example_id": str(i), "label": lab} for i, lab in enumerate(LABELS)]
    names = ["baseline", "eoi->text", "image->text", "last_image->text", "eoi->eoi+text"]
    records = _records(rows, {f"last:{n}": CROSS for n in names})  # baseline overlap 0, chance 1/3
    with pytest.raises(BaselineAtChance, match=r"baseline scores 0.0000 overlap@last .* chance \(0.3333"):
        EXPERIMENTS["ablation"]().aggregate(records, _cfg("ablation", task="classes", k=1), {"n_layers": 2})


def test_patching_means_per_resid_and_per_pair():
    sim = np.array([[0.1, 0.9], [0.3, 0.5], [0.8, 0.2]])  # 3 units x 2 patched residual indices
    acc = np.array([[0, 1], [0, 1], [1, 0]])
    rows = [
        {
            "example_id": f"u{i}",
            "pair": p,
            "base": p[0],
            "target": p[-1],
            "base_word": p[0] + "w",
            "target_word": p[-1] + "w",
        }
        for i, p in enumerate(["x<-y", "x<-y", "z<-w"])
    ]
    # score(target) - score(base): unpatched +, -, +; patched (+, -), (-, +), (-, +) -> flips (0, 1), (0, 1), (1, 0)
    scores = {
        "score_target_unpatched": [1.0, -1.0, 2.0],
        "score_base_unpatched": [0.0, 0.0, 0.0],
        "score_target": [[1.0, -1.0], [-1.0, 1.0], [-3.0, 3.0]],
        "score_base": [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
    }
    records = _records(
        rows,
        {
            "similarity": sim,
            "accuracy": acc,
            "similarity_unpatched": [0.2, 0.4, 0.6],
            "accuracy_unpatched": [0, 0, 1],
            **scores,
        },
    )
    tables = EXPERIMENTS["patching"]().aggregate(records, _cfg("patching"), {"n_layers": 2})
    curve = tables["patching"]
    np.testing.assert_allclose(curve["similarity"], [0.4, 1.6 / 3])
    np.testing.assert_allclose(curve["accuracy"], [1 / 3, 2 / 3])
    np.testing.assert_allclose(curve["flip_rate"], [1 / 3, 2 / 3])
    assert list(curve["resid"]) == [0, 1] and curve["similarity_unpatched"].iloc[0] == pytest.approx(0.4)
    pairs = tables["patching_pairs"].set_index("pair")
    assert pairs.loc["x<-y", "best_resid"] == 1 and pairs.loc["x<-y", "max_similarity"] == pytest.approx(0.7)
    assert pairs.loc["z<-w", "best_resid"] == 0 and pairs.loc["z<-w", "n"] == 1
    assert pairs.loc["x<-y", "max_flip_rate"] == 1.0 and pairs.loc["z<-w", "max_flip_rate"] == 1.0
    assert (pairs.loc["x<-y", "base"], pairs.loc["x<-y", "target"]) == ("xw", "yw")


def test_steering_counts_texts_naming_each_class():
    rows = [
        {
            "example_id": "1",
            "pair": "cat<-dog",
            "base": "cat",
            "target": "dog",
            "resids": "1-2",
            "text_unpatched": "a cat",
            "text_steered": "a Dog",
        },
        {
            "example_id": "2",
            "pair": "cat<-dog",
            "base": "cat",
            "target": "dog",
            "resids": "1-2",
            "text_unpatched": "a cat",
            "text_steered": "a cat and a dog",
        },
        {
            "example_id": "3",
            "pair": "fox<-owl",
            "base": "fox",
            "target": "owl",
            "resids": "1-2",
            "text_unpatched": "fox",
            "text_steered": "a bowl, not a fox",  # "owl" inside "bowl" is not the word owl
        },
    ]
    tables = EXPERIMENTS["steering"]().aggregate(_records(rows), _cfg("steering"), {"n_layers": 4})
    s = tables["steering"].iloc[0]
    assert (s["names_target_steered"], s["names_base_steered"]) == pytest.approx((2 / 3, 2 / 3))
    assert s["names_target_not_base_steered"] == pytest.approx(1 / 3) and s["names_target_not_base_unpatched"] == 0
    assert (s["names_target_unpatched"], s["names_base_unpatched"], s["n"]) == (0.0, 1.0, 3)
    pairs = tables["steering_pairs"].set_index("pair")
    assert pairs.loc["cat<-dog", "target_steered"] == 1.0 and pairs.loc["fox<-owl", "target_steered"] == 0.0
    assert pairs.loc["cat<-dog", "target_not_base_steered"] == 0.5


def test_gate_scan_ranks_positions_and_divides_by_the_whole_image():
    names, roles = ["boi", "image[0]", "image[1]", "eoi"], ["boi", "image_content", "image_content", "eoi"]
    grid = [[-1, -1], [0, 0], [0, 1], [-1, -1]]
    kinds = (("e1", [0.0, 0.1, 0.1, 0.8], 0.1, 1.0), ("e2", [0.0, 0.2, 0.0, 0.6], 0.3, 2.0))
    rows = [
        {
            "example_id": f"{e}-{i}",
            "positions": names,
            "roles": roles,
            "grid": grid,
            "damage": d,
            "damage_other": [x / 2 for x in d],
            "all_but": [1.0, 0.9, 0.9, w],  # everything but eoi knocked out: w of the whole image's 1.0
            "whole": 1.0,
            "whole_other": 0.5,
            "k90": k,
            "window_top": ["eoi", "image[0]", "image[1]"],
            "window_damage": [[0.5, 0.1, 0.0, 0.6], [0.2, 0.0, 0.1, 0.4]],
            "logp_change": [0.0] * 4,
        }
        for i in range(5)
        for e, d, w, k in kinds
    ]
    cfg = _cfg("gate-scan", bootstrap=200, windows=2)
    tables = EXPERIMENTS["gate-scan"]().aggregate(_records(rows), cfg, {"n_layers": 4})
    positions = tables["positions"]
    assert list(positions["position"]) == ["eoi", "image[0]", "image[1]", "boi"]
    np.testing.assert_allclose(positions["damage"], [0.7, 0.15, 0.05, 0.0])
    np.testing.assert_allclose(positions["damage_zero"], [0.35, 0.075, 0.025, 0.0])
    np.testing.assert_allclose(positions["sufficiency"], [0.8, 0.1, 0.1, 0.0])
    gate = tables["gate"].iloc[0]
    # eoi tops every half of 5, so the split-half index is the mean over both halves: the overall mean
    assert gate["top_position"] == "eoi" and gate["gate_index"] == pytest.approx(0.7) and gate["top_stability"] == 1
    assert gate["gate_index_zero"] == pytest.approx(0.7) and gate["whole_damage_zero"] == pytest.approx(0.5)
    assert gate["sufficiency"] == pytest.approx(0.8) and gate["sufficiency_low"] <= 0.8 <= gate["sufficiency_high"]
    assert gate["positions_for_90"] == 1.5 and gate["whole_except_top_damage"] == pytest.approx(0.2)
    assert gate["gate_low"] <= 0.7 <= gate["gate_high"] and gate["n_exact"] == 10
    assert gate["verdict"].startswith("a narrow gate at eoi")
    layers = tables["layers"]
    whole = layers[layers["what"] == "image side"].set_index("window")["damage"]
    assert whole.to_dict() == pytest.approx({"0-1": 0.6, "2-3": 0.4})
    top1 = layers[layers["what"] == "top 1"].set_index("window")["damage"]
    assert top1.to_dict() == pytest.approx({"0-1": 0.5, "2-3": 0.2})


def test_modality_gap_median_per_resid():
    rng = np.random.default_rng(0)
    n = 40
    image = np.stack([np.tile([1.0, 0.0], (n, 1)), np.tile([1.0, 0.0], (n, 1))], 1) + rng.normal(0, 1e-3, (n, 2, 2))
    text = np.stack([np.tile([0.0, 1.0], (n, 1)), np.tile([1.0, 0.0], (n, 1))], 1) + rng.normal(0, 1e-3, (n, 2, 2))
    rows = [{"example_id": str(i), "text_position": 0, "image_position": 0} for i in range(n)]
    table = EXPERIMENTS["modality-gap"]().aggregate(
        _records(rows, {"text": text, "image": image}), _cfg("modality-gap"), {"n_layers": 1}
    )["modality_gap"]
    assert list(table["resid"]) == [0, 1]
    np.testing.assert_allclose(table["median"], [0.0, 1.0], atol=1e-2)
    gap = EXPERIMENTS["modality-gap"]().aggregate(
        _records(rows, {"text": text, "image": image}), _cfg("modality-gap", outputs_only=True), {"n_layers": 2}
    )
    assert list(gap["modality_gap"]["resid"]) == [1, 2]
