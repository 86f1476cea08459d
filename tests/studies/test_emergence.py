"""The emergence study: its grid, its registered verdict rule on planted results, and a 2-model tiny study end to
end through the command line (trained, measured by the experiments, resumed without retraining)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from typer.testing import CliRunner

import narrowgate
from narrowgate import organisms
from narrowgate.cli import app
from narrowgate.data.prompts import VQA
from narrowgate.data.synthetic import synthetic_classes
from narrowgate.errors import OptionError
from narrowgate.organisms import heldout, native
from narrowgate.store import DirectoryLock, RunLocked
from narrowgate.studies import emergence as em

#: The tiny study's measurements: every experiment of the real plan, on a handful of examples.
TINY_PLAN = (
    ("gate-scan", "gate-scan", dict(mode="mask", n_per_class=2, bootstrap=50)),
    ("gate-scan-zero", "gate-scan", dict(mode="zero", n_per_class=2, bootstrap=50)),
    ("ablation-vqa", "ablation", dict(task="vqa", n=12, vqa_prompt=VQA, max_new_tokens=4)),
    ("ablation-captions", "ablation", dict(task="captions", n=6, max_new_tokens=6)),
    ("ablation-classes", "ablation", dict(task="classes", n_per_class=4, k=2)),
    ("cross-attention", "cross-attention", dict(n_per_class=2)),
)
TINY_ONLY = ["tokens=16", "layers=4", "seed=0", "share=0,1"]


def test_grid_is_the_registered_design():
    points = em.grid()
    assert len(points) == 28 and len({p.name for p in points}) == 28
    per_share = pd.Series([p.share for p in points]).value_counts()
    assert per_share[0.0] == per_share[0.8] == 8 and per_share[0.2] == per_share[0.5] == per_share[1.0] == 4
    assert {(p.image_tokens, p.layers) for p in points} == {(16, 4), (16, 8), (64, 4), (64, 8)}
    # Run order: shares 0, 0.5 and 1.0 in every cell first (cheapest cell first), the other shares, the extra seeds.
    first = [(p.share, p.image_tokens, p.layers) for p in points[:12]]
    assert first[:3] == [(0.0, 16, 4), (0.5, 16, 4), (1.0, 16, 4)] and first[-1] == (1.0, 64, 8)
    assert {p.share for p in points[:12]} == {0.0, 0.5, 1.0} and all(p.seed == 0 for p in points[:20])
    assert all(p.seed == 1 for p in points[20:])
    full = next(p for p in points if p.share == 1.0)
    assert full.trained_share == pytest.approx(0.9)
    cfg = full.config(em.RECIPE)
    assert (cfg.generation_share, cfg.image_tokens, cfg.layers, cfg.steps) == (0.9, full.image_tokens, full.layers, 800)
    assert cfg.hidden == native.NativeConfig().hidden and cfg.vq_steps == native.NativeConfig().vq_steps


def test_only_selects_the_matching_points_and_refuses_what_the_grid_lacks():
    chosen = em.select(em.grid(), em.parse_only(["share=0,0.8", "tokens=16"]))
    assert len(chosen) == 8 and {p.share for p in chosen} == {0.0, 0.8} and {p.image_tokens for p in chosen} == {16}
    assert [p.name for p in em.select(em.grid(), em.parse_only(TINY_ONLY))] == [
        "share0-tokens16-layers4-seed0",
        "share1-tokens16-layers4-seed0",
    ]
    for bad, match in (("share=0.3", "no share '0.3'"), ("foo=1", "KEY one of"), ("seed=7", "no seed '7'")):
        with pytest.raises(OptionError, match=match):
            em.parse_only([bad])
    result = CliRunner().invoke(app, ["study", "emergence", "--only", "layers=6"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "no layers '6'" in result.output


def planted(index_of, *, vqa=0.9, low_margin=0.05, verdict="neither knockout changes the scores much") -> pd.DataFrame:
    """A full grid of results whose mask-mode gate index is ``index_of(point)``."""
    rows = []
    for p in em.grid():
        g = index_of(p)
        rows.append(
            {
                "model": p.name,
                "generation_share": p.share,
                "image_tokens": p.image_tokens,
                "layers": p.layers,
                "seed": p.seed,
                "heldout_vqa": vqa,
                "heldout_vqa_chance": 0.15,
                "gate_index_mask": g,
                "gate_low_mask": g - low_margin,
                "gate_high_mask": g + low_margin,
                "ablation_verdict": f"{p.name}: ... — {verdict}.",
            }
        )
    return pd.DataFrame(rows)


def test_trend_statistic_is_the_mean_within_cell_spearman():
    rng = np.random.default_rng(3)
    df = planted(lambda p: float(rng.uniform()))
    t = em.trend(df, permutations=200)
    reference = np.mean(
        [spearmanr(g["generation_share"], g["gate_index_mask"])[0] for _, g in df.groupby(["image_tokens", "layers"])]
    )
    assert t["statistic"] == pytest.approx(reference)
    assert len(t["cells"]) == 4 and all(c["n"] == 7 for c in t["cells"].values())


def test_trend_p_value_matches_the_exact_permutation_distribution():
    """Two cells of three models, the index rising with the share: S = 1, reached by 1 of the 6 x 6 within-cell
    permutations, so p(rise) = 1/36 (up to sampling of the permutations)."""
    df = pd.DataFrame(
        [
            {
                "model": f"{tokens}-{share}",
                "generation_share": share,
                "image_tokens": tokens,
                "layers": 4,
                "seed": 0,
                "heldout_vqa": 0.9,
                "heldout_vqa_chance": 0.15,
                "gate_index_mask": 0.1 + share,
                "gate_low_mask": 0.0,
            }
            for tokens in (16, 64)
            for share in (0.0, 0.5, 1.0)
        ]
    )
    t = em.trend(df, permutations=20_000)
    assert t["statistic"] == pytest.approx(1.0)
    assert t["p_increase"] == pytest.approx(1 / 36, abs=0.005)
    assert t["p_decrease"] == pytest.approx(1.0)


def test_verdict_follows_the_registered_rule():
    rising = planted(lambda p: 0.05 + 0.5 * p.share + 0.01 * p.seed)
    v = em.verdict(rising, permutations=2000)
    assert v["outcome"] == "generation concentrates, no gate" and v["trend"]["p_increase"] < em.ALPHA
    assert v["complete"] and v["analysed"] == 28 and v["gates"] == []
    # The same rise, with the ablation agreeing: the models whose whole interval clears 0.5 have a gate.
    agreeing = planted(lambda p: 0.1 + 0.6 * p.share + 0.01 * p.seed, verdict="a narrow gate: blocking [EOI]")
    v = em.verdict(agreeing, permutations=2000)
    assert v["outcome"] == "gate emerges with generation"
    judged = em.judge(agreeing)
    assert set(v["gates"]) == set(judged.loc[judged["gate_low_mask"] >= 0.5, "model"])
    assert all(judged.set_index("model").loc[v["gates"], "generation_share"] >= 0.8)
    falling = planted(lambda p: 0.6 - 0.5 * p.share + 0.01 * p.seed)
    assert em.verdict(falling, permutations=2000)["outcome"] == "reverse"
    noise = iter(np.random.default_rng(0).uniform(0.0, 0.1, 28))
    flat = planted(lambda p: float(next(noise)))
    assert em.verdict(flat, permutations=2000)["outcome"] == "no effect of generation"
    # Models that do not read the image are excluded (and listed); with one cell left there is no test.
    blind = rising.copy()
    blind.loc[blind["image_tokens"] == 64, "heldout_vqa"] = 0.2
    blind.loc[blind["layers"] == 8, "gate_index_mask"] = math.nan
    v = em.verdict(blind, permutations=200)
    assert v["outcome"] == "not enough models" and v["analysed"] == 7 and len(v["excluded"]) == 21


def test_exploratory_columns_are_reported_but_never_decide_the_outcome():
    flat = planted(lambda p: 0.05 + 0.001 * (p.seed + p.layers))
    alone = flat.assign(
        eoi_sufficiency_mask=[0.1 + 0.8 * s for s in flat["generation_share"]],
        eoi_necessity_mask=0.01 + 0.001 * flat["layers"],
    )
    registered, with_exploratory = em.verdict(flat, permutations=500), em.verdict(alone, permutations=500)
    assert registered["outcome"] == with_exploratory["outcome"] == "no effect of generation"
    assert registered["exploratory"] == {} and set(with_exploratory["exploratory"]) == set(em.EXPLORATORY)
    rise = with_exploratory["exploratory"]["eoi_sufficiency_mask"]
    assert rise["statistic"] == pytest.approx(1.0) and rise["p_increase"] < em.ALPHA
    text = em.summary_markdown(alone, with_exploratory)
    assert "*Exploratory, not registered*" in text and "eoi_sufficiency_mask 1.00" in text


def test_a_gate_needs_the_whole_interval_and_the_ablation():
    df = planted(lambda p: 0.7, verdict="a narrow gate: blocking [EOI]").head(3)
    df.loc[1, "gate_low_mask"] = 0.45
    df.loc[2, "ablation_verdict"] = "distributed communication"
    assert em.judge(df)["gate"].tolist() == [True, False, False]


def test_training_resumes_and_never_keeps_a_half_written_checkpoint(tmp_path, monkeypatch):
    calls = []

    def fake_train(kind, out, *, seed, progress, overrides, heldout):
        calls.append((kind, seed, overrides["generation_share"], overrides["image_tokens"], overrides["layers"]))
        out.mkdir(parents=True)
        (out / "card.json").write_text("{}")

    monkeypatch.setattr(organisms, "train", fake_train)
    point = em.Point(1.0, 16, 8, 1)
    leftover = tmp_path / point.name / "model.partial"
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("killed mid-training")
    model = em.train_point(point, tmp_path, em.RECIPE, None, False)
    assert model == tmp_path / point.name / "model" and (model / "card.json").is_file()
    assert not leftover.exists() and calls == [("native", 1, 0.9, 16, 8)]
    em.train_point(point, tmp_path, em.RECIPE, None, False)
    assert len(calls) == 1  # a finished checkpoint is not retrained


def test_a_study_directory_in_use_is_refused(tmp_path):
    lock = DirectoryLock(tmp_path)
    lock.acquire("the other study")
    try:
        with pytest.raises(RunLocked, match="the other study"):
            em.run_study(tmp_path, tmp_path / "work", only=em.parse_only(TINY_ONLY), progress=False)
    finally:
        lock.release()


@pytest.mark.slow  # about a minute: two organisms trained and measured by six experiment runs each
def test_tiny_study_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(em, "RECIPE", native.TINY)
    monkeypatch.setattr(em, "PLAN", TINY_PLAN)
    monkeypatch.setattr(heldout, "SIZES", {"vqa": 12, "captions": 6, "classes": 2})
    out, work = tmp_path / "study", tmp_path / "work"
    args = ["study", "emergence", "--out", str(out), "--work", str(work), "--quiet"]
    args += [a for only in TINY_ONLY for a in ("--only", only)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    results = pd.read_csv(out / "results.csv")
    assert results["model"].tolist() == ["share0-tokens16-layers4-seed0", "share1-tokens16-layers4-seed0"]
    for col in (
        "generation_share",
        "trained_generation_share",
        "image_tokens",
        "layers",
        "seed",
        "heldout_vqa",
        "vqa_baseline",
        "captions_baseline",
        "classes_baseline",
        "gate_index_mask",
        "gate_low_mask",
        "gate_high_mask",
        "positions_for_90_mask",
        "gate_index_zero",
        "positions_for_90_zero",
        "eoi_relative",
        "image_relative",
        "eoi_attention_share",
        "train_seconds",
    ):
        assert col in results, col
    assert results["trained_generation_share"].tolist() == [0.0, 0.9]
    # Every number is the experiments' own, read from their run directories.
    for _, row in results.iterrows():
        runs = work / row["model"] / "measure" / row["model"]
        for mode, name in em.SCANS.items():
            gate = pd.read_csv(runs / name / "tables" / "gate.csv").iloc[0]
            assert gate["mode"] == mode
            assert row[f"gate_index_{mode}"] == pytest.approx(gate["gate_index"], nan_ok=True)
            assert row[f"positions_for_90_{mode}"] == pytest.approx(gate["positions_for_90"], nan_ok=True)
        table = runs / "ablation-vqa" / "tables" / "ablation.csv"
        if row["vqa_at_chance"]:  # refused by the ablation: no table, no number
            assert not table.exists() and math.isnan(row["vqa_baseline"]) and math.isnan(row["vqa_eoi_relative"])
        else:
            ablation = pd.read_csv(table).set_index("condition")
            assert row["vqa_baseline"] == pytest.approx(ablation.loc["baseline", "score"])
        eoi = pd.read_csv(runs / "gate-scan" / "tables" / "positions.csv").set_index("role").loc["eoi"]
        assert row["eoi_sufficiency_mask"] == pytest.approx(eoi["sufficiency"], nan_ok=True)
        assert row["eoi_necessity_mask"] == pytest.approx(eoi["damage"] / row["whole_damage_mask"], nan_ok=True)
        roles = pd.read_csv(runs / "cross-attention" / "tables" / "cross_attention_roles.csv")
        assert row["eoi_attention_share"] == pytest.approx(roles.query("role == 'eoi'")["fraction"].mean())
        card = json.loads((out / "cards" / row["model"] / "card.json").read_text())
        assert card == json.loads((work / row["model"] / "model" / "card.json").read_text())
        assert card["config"]["generation_share"] == row["trained_generation_share"]
        assert card["config"]["image_tokens"] == 16 and card["config"]["layers"] == 4
        assert (
            row["train_seconds"] == card["train_seconds"] and row["heldout_vqa"] == card["heldout"]["vqa"]["accuracy"]
        )
    vlm = narrowgate.load(work / results["model"][0] / "model")
    batch = vlm.prepare([synthetic_classes(1)[0].load_image()], ["This shape is a"])
    assert len(batch.layouts[0].content) == 16
    assert (out / "emergence.png").stat().st_size > 0 and (out / "cards" / results["model"][1] / "CARD.md").is_file()
    summary = (out / "summary.md").read_text().splitlines()
    assert summary[0].startswith("**not enough models**") and len(summary) == 6 + len(results)
    assert all(f"| {m} |" in "\n".join(summary) for m in results["model"])
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["models"] == 2 and verdict["planned"] == 28 and not verdict["complete"]
    assert len((out / "commands.txt").read_text().splitlines()) == 1  # each invocation, with its time

    # Resuming: nothing is trained or measured again.
    monkeypatch.setattr(organisms, "train", lambda *a, **k: pytest.fail("retrained a finished model"))
    again = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert "0 to do" in again.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), results)
    assert len((out / "commands.txt").read_text().splitlines()) == 2
    # Counts are written as integers, and each mode's figures come from that mode's own scan, once.
    header, first = (out / "results.csv").read_text().splitlines()[:2]
    assert dict(zip(header.split(","), first.split(",")))["image_tokens"] == "16"
    assert not [c for c in results if c.endswith(("_mask_mask", "_mask_zero", "_zero_mask", "_zero_zero"))]

    # Rows are rebuilt from the run directories on every invocation: a stale number is put right, and a deleted
    # run is measured again (here the zero-mode scan of the second model) and its new table gives the row.
    stale = results.copy()
    stale.loc[0, "gate_index_mask"] = 99.0
    stale.to_csv(out / "results.csv", index=False)
    second = results["model"][1]
    scan = work / second / "measure" / second / "gate-scan-zero"
    shutil.rmtree(scan)
    third = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert third.exit_code == 0, third.output
    assert "measuring gate-scan-zero again" in third.output
    refreshed = pd.read_csv(out / "results.csv")
    assert refreshed.loc[0, "gate_index_mask"] == pytest.approx(results.loc[0, "gate_index_mask"], nan_ok=True)
    gate = pd.read_csv(scan / "tables" / "gate.csv").iloc[0]
    assert refreshed.loc[1, "gate_index_zero"] == pytest.approx(gate["gate_index"], nan_ok=True)
    pd.testing.assert_frame_equal(refreshed, results)  # same data, same seed: the same scan
    # Another scale in the same directory is refused, on one line.
    other = CliRunner().invoke(app, [*args, "--scale", "0.5"])
    assert (
        other.exit_code == 1 and "holds a study with other settings" in other.output and other.output.count("\n") == 1
    )


def test_a_failed_model_costs_that_model_and_is_retried(tmp_path, monkeypatch):
    trained = []

    def fake_train(kind, out, *, seed, progress, overrides, heldout):
        trained.append(overrides["generation_share"])
        if overrides["generation_share"] == 0.0:
            raise RuntimeError("loss is NaN")
        out.mkdir(parents=True)
        for name in ("card.json", "CARD.md"):
            (out / name).write_text("{}")

    monkeypatch.setattr(organisms, "train", fake_train)
    monkeypatch.setattr(em, "measure_point", lambda point, model, *a: model)
    monkeypatch.setattr(
        em, "row_of", lambda p, *a: {"model": p.name, **{f: getattr(p, f) for f in ("image_tokens", "layers", "seed")}}
    )
    out = tmp_path / "study"
    results = em.run_study(out, tmp_path / "work", only=em.parse_only(TINY_ONLY), progress=False)
    assert results["model"].tolist() == ["share1-tokens16-layers4-seed0"] and trained == [0.0, 0.9]
    failures = pd.read_csv(out / "failures.csv")
    assert failures.to_dict("records") == [
        {"model": "share0-tokens16-layers4-seed0", "stage": "training", "reason": "RuntimeError: loss is NaN"}
    ]
    em.run_study(out, tmp_path / "work", only=em.parse_only(TINY_ONLY), progress=False)
    assert trained == [0.0, 0.9, 0.0]  # the failed model is retried, the measured one is not


def test_out_and_work_must_be_directories(tmp_path):
    (tmp_path / "file").write_text("")
    for args in ({"out": tmp_path / "file"}, {"out": tmp_path / "o", "work": tmp_path / "file"}):
        with pytest.raises(OptionError, match="is a file; give a directory"):
            em.run_study(**{"work": tmp_path / "w", **args}, progress=False)
