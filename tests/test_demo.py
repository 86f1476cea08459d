"""The demo on tiny sample sizes: every sub-run, the side-by-side report and a verdict from the numbers."""

from __future__ import annotations

import html
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from narrowgate.cli import app
from narrowgate.demo import NO_VERDICT, PLAN, REMOVED, SUMMARY, demo, verdict

pytestmark = pytest.mark.slow  # minutes: demo runs, fine-tuning, the paper datasets' layouts


def test_demo_command_runs_every_experiment_on_the_shipped_organisms(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--scale", "0.05"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    # CliRunner's output is not a terminal: every phase prints plain progress lines (counts, elapsed, estimate);
    # between two lines of one phase at most 30 s pass (tests/test_progress.py, on a fake clock).
    # (Not anchored at line starts: transformers' own bars, imported before the command could switch them off,
    # write to the same captured stream without a newline of their own.)
    log = result.output
    for phase in ("held-out scores before training", "finetune remove-gate", "held-out scores after training"):
        assert re.search(rf"{phase}[^:\n]*: 0/\d+ \(0%\)", log) and re.search(rf"{phase}[^\n]*finished\n", log), phase
    for family in ("chameleon", "llava"):
        for experiment in {e for _, e, _ in PLAN}:
            assert re.search(rf"{experiment} \({family}\): \d+/\d+ \(100%\), [^\n]* elapsed, finished\n", log)
    n = 4 * len(PLAN)
    assert f"(demo runs 0/{n}, " in log and re.search(rf"\(demo runs {n - 1}/{n}, .* elapsed, ~.* left\)", log)
    text = (out / "report.html").read_text()
    assert text.count("data:image/png;base64") >= 2 * len(PLAN)
    assert "VQA accuracy (chance)" in text  # the organisms' held-out scores, from their cards
    summary = pd.read_csv(out / "summary.csv")
    for label in ("native", "non-native", "gated", REMOVED):
        assert f"<li>{label}:" in text
        assert f"{label}: " in result.output
        for name, _, _ in PLAN:
            # The gate-removed model is a fine-tuning of a few steps at this scale: an ablation of it whose
            # baseline is at chance is refused (records kept, no tables), said in the report, and left out.
            refused = name.startswith("ablation") and not (out / label / name / "tables" / "ablation.csv").exists()
            assert label == REMOVED or not refused, (label, name)
            assert (out / label / name / "report.html").exists() or refused, (label, name)
            if refused:
                assert name.removeprefix("ablation-") not in set(summary[summary["model"] == label]["task"])
                assert "No relative scores: The baseline scores" in text
    assert set(summary["condition"]) == set(SUMMARY)
    assert {"native", "non-native", "gated"} <= set(summary["model"])
    shipped = summary[summary["model"] != REMOVED]
    assert set(shipped.groupby("model")["task"].agg(frozenset)) == {frozenset({"vqa", "captions", "classes"})}
    # The organisms answer the prompt they learnt (a family preset such as Chameleon's " Answer:" broke them).
    # (The gate-removed model is a fine-tuning of a few steps at this scale: only the shipped organisms are held to it.)
    vqa = summary[(summary["task"] == "vqa") & (summary["condition"] == "baseline") & (summary["model"] != REMOVED)]
    assert (vqa["score"] >= 0.5).all(), vqa
    gates = pd.read_csv(out / "gates.csv").fillna("")
    assert set(gates["model"]) == {"native", "non-native", "gated", REMOVED} and "Gate scan" in text
    assert set(gates["agrees_with_ablation"]) <= {"agrees", "DISAGREES", ""}
    # Every number shown comes from the sub-runs' own tables, and every verdict from those numbers.
    for _, row in summary.iterrows():
        table = pd.read_csv(out / row["model"] / f"ablation-{row['task']}" / "tables" / "ablation.csv")
        assert row["score"] == pytest.approx(table.set_index("condition").loc[row["condition"], "score"])
    for _, g in gates.iterrows():
        scan = pd.read_csv(out / g["model"] / "gate-scan" / "tables" / "gate.csv").iloc[0]
        assert g["gate_index"] == pytest.approx(scan["gate_index"], nan_ok=True)
        assert g["top_position"] == scan["top_position"] and scan["verdict"] in g["verdict"]
    refused = {
        label: {
            n: "" for n, _, _ in PLAN if n.startswith("abl") and not (out / label / n / "tables/ablation.csv").exists()
        }
        for label in gates["model"]
    }
    for sentence in verdict(summary, models=[*gates["model"]], refused=refused).values():
        assert html.escape(sentence) in text and sentence in " ".join(result.output.split())


def test_demo_runs_on_any_two_checkpoints_and_gives_no_verdict_at_chance(checkpoint_dir, tmp_path):
    """Random-weight checkpoints answer nothing: their ablations refuse the baseline, and the demo says so
    instead of a verdict (item 4: no verdict without a baseline above chance)."""
    models = {"chameleon": checkpoint_dir("chameleon"), "llava": checkpoint_dir("llava")}
    plan = [step for step in PLAN if step[1] == "ablation"][:1]
    report = demo(tmp_path / "demo", models, scale=0.05, batch_size=4, progress=False, plan=plan)
    text = report.read_text()
    for label in models:
        assert f"<li>{label}: {NO_VERDICT} — its baseline is at or below chance on every task (vqa)" in text
        assert "No relative scores: The baseline scores" in text
        assert (tmp_path / "demo" / label / "ablation-vqa" / "records").is_dir()  # the records are kept
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert pd.read_csv(tmp_path / "demo" / "summary.csv").empty


def _summary(models: dict[str, dict[str, tuple[float, float, float, float]]]) -> pd.DataFrame:
    """model -> task -> (baseline, eoi->text, image->text, chance) as `summarize` writes them."""
    rows = []
    for model, tasks in models.items():
        for task, (base, eoi, image, chance) in tasks.items():
            for cond, score in zip(SUMMARY, (base, eoi, image)):
                rows.append(
                    {
                        "model": model,
                        "task": task,
                        "metric": "m",
                        "condition": cond,
                        "score": score,
                        "relative": score / base if base else float("inf"),
                        "chance": chance,
                    }
                )
    return pd.DataFrame(rows)


def test_verdict_follows_the_numbers():
    v = verdict(
        _summary(
            {
                "gate": {"vqa": (0.5, 0.1, 0.45, 0.1)},
                "spread": {"vqa": (0.5, 0.475, 0.15, 0.1)},
                "flat": {"vqa": (0.5, 0.5, 0.49, 0.1)},
                "dead": {"vqa": (0.0, 0.0, 0.0, 0.0)},
            }
        )
    )
    assert "narrow gate" in v["gate"] and "distributed" in v["spread"]
    assert "neither" in v["flat"] and NO_VERDICT in v["dead"]


def test_no_verdict_from_baselines_at_chance():
    """The issue's case: "gated, gate removed" at --scale 0.02 had VQA 0.10 (chance 0.15) and classes 0.000, and
    was called "a narrow gate". Tasks at chance are left out and named; with none left there is no verdict."""
    at_chance = {"vqa": (0.10, 0.02, 0.10, 0.15), "classes": (0.0, 0.0, 0.0, 0.17)}
    v = verdict(_summary({REMOVED: at_chance}), models=[REMOVED, "refused"], refused={"refused": {"ablation-vqa": "x"}})
    assert v[REMOVED].startswith(f"{REMOVED}: {NO_VERDICT}") and "(classes, vqa)" in v[REMOVED]
    assert "gate" not in v[REMOVED].split("—", 1)[1]
    assert v["refused"] == f"refused: {NO_VERDICT} — its baseline is at or below chance on every task (vqa), " + (
        "so scores relative to it are undefined."
    )
    mixed = verdict(_summary({"m": {**at_chance, "captions": (5.0, 1.0, 4.9, 0.8)}}))["m"]
    assert "over captions (classes, vqa: baseline at chance, left out) is 0.20" in mixed and "narrow gate" in mixed


def test_remove_gate_miniature_and_its_report_table(checkpoint_dir, tmp_path):
    from rich.console import Console

    from narrowgate.demo import REMOVED, removal_table, remove_gate

    merged = remove_gate(
        tmp_path / "rg", checkpoint_dir("chameleon"), scale=0.02, progress=False, console=Console(quiet=True)
    )
    assert (merged / "config.json").is_file() and (tmp_path / "rg" / "card.json").is_file()
    rows = [
        {"model": m, "task": "vqa", "metric": "m", "condition": c, "score": s, "relative": s / 0.8, "chance": 0.1}
        for m, e in (("gated", 0.1), (REMOVED, 0.7))
        for c, s in (("baseline", 0.8), ("eoi->text", e))
    ]
    table = removal_table(pd.DataFrame(rows))
    row = table.set_index("condition").loc["eoi->text"]
    assert row["before (relative)"] == pytest.approx(0.125) and row["after (relative)"] == pytest.approx(0.875)
