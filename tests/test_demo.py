"""The demo on tiny sample sizes: every sub-run, the side-by-side report and a verdict from the numbers."""

from __future__ import annotations

import html
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from narrowgate.cli import app
from narrowgate.demo import PLAN, REMOVED, SUMMARY, demo, verdict

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
    for label in ("native", "non-native", "gated", REMOVED):
        assert f"<li>{label}:" in text
        assert f"{label}: " in result.output
        for name, _, _ in PLAN:
            assert (out / label / name / "report.html").exists()
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["condition"]) == set(SUMMARY)
    assert set(summary["model"]) == {"native", "non-native", "gated", REMOVED}
    assert set(summary["task"]) == {"vqa", "captions", "classes"}
    # The organisms answer the prompt they learnt (a family preset such as Chameleon's " Answer:" broke them).
    # (The gate-removed model is a fine-tuning of a few steps at this scale: only the shipped organisms are held to it.)
    vqa = summary[(summary["task"] == "vqa") & (summary["condition"] == "baseline") & (summary["model"] != REMOVED)]
    assert (vqa["score"] >= 0.5).all(), vqa
    gates = pd.read_csv(out / "gates.csv").fillna("")
    assert set(gates["model"]) == set(summary["model"]) and "Gate scan" in text
    assert set(gates["agrees_with_ablation"]) <= {"agrees", "DISAGREES", ""}
    # Every number shown comes from the sub-runs' own tables, and every verdict from those numbers.
    for _, row in summary.iterrows():
        table = pd.read_csv(out / row["model"] / f"ablation-{row['task']}" / "tables" / "ablation.csv")
        assert row["score"] == pytest.approx(table.set_index("condition").loc[row["condition"], "score"])
    for _, g in gates.iterrows():
        scan = pd.read_csv(out / g["model"] / "gate-scan" / "tables" / "gate.csv").iloc[0]
        assert g["gate_index"] == pytest.approx(scan["gate_index"], nan_ok=True)
        assert g["top_position"] == scan["top_position"] and scan["verdict"] in g["verdict"]
    for sentence in verdict(summary).values():
        assert html.escape(sentence) in text and sentence in " ".join(result.output.split())


def test_demo_runs_on_any_two_checkpoints(checkpoint_dir, tmp_path):
    models = {"chameleon": checkpoint_dir("chameleon"), "llava": checkpoint_dir("llava")}
    plan = [step for step in PLAN if step[1] == "ablation"][:1]
    report = demo(tmp_path / "demo", models, scale=0.05, batch_size=4, progress=False, plan=plan)
    assert "chameleon:" in report.read_text() and "llava:" in report.read_text()


def test_verdict_follows_the_numbers():
    rows = []
    for model, eoi, image in (("gate", 0.2, 0.9), ("spread", 0.95, 0.3), ("flat", 1.0, 0.98), ("dead", 0, 0)):
        for cond, rel in (("baseline", 1.0), ("eoi->text", eoi), ("image->text", image)):
            score = 0.0 if model == "dead" else 0.5 * rel
            rows.append(
                {"model": model, "task": "vqa", "metric": "m", "condition": cond, "score": score, "relative": rel}
            )
    v = verdict(pd.DataFrame(rows))
    assert "narrow gate" in v["gate"] and "distributed" in v["spread"]
    assert "neither" in v["flat"] and "near zero" in v["dead"]


def test_remove_gate_miniature_and_its_report_table(checkpoint_dir, tmp_path):
    from rich.console import Console

    from narrowgate.demo import REMOVED, removal_table, remove_gate

    merged = remove_gate(
        tmp_path / "rg", checkpoint_dir("chameleon"), scale=0.02, progress=False, console=Console(quiet=True)
    )
    assert (merged / "config.json").is_file() and (tmp_path / "rg" / "card.json").is_file()
    rows = [
        {"model": m, "task": "vqa", "metric": "m", "condition": c, "score": s, "relative": s / 0.8}
        for m, e in (("gated", 0.1), (REMOVED, 0.7))
        for c, s in (("baseline", 0.8), ("eoi->text", e))
    ]
    table = removal_table(pd.DataFrame(rows))
    row = table.set_index("condition").loc["eoi->text"]
    assert row["before (relative)"] == pytest.approx(0.125) and row["after (relative)"] == pytest.approx(0.875)
