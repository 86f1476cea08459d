"""The demo on tiny sample sizes: every sub-run, the side-by-side report and a verdict from the numbers."""

from __future__ import annotations

import pandas as pd

from narrowgate.demo import PLAN, demo, verdict


def test_demo_runs_every_experiment_on_two_models(checkpoint_dir, tmp_path):
    models = {"native": checkpoint_dir("chameleon"), "non-native": checkpoint_dir("llava")}
    report = demo(tmp_path / "demo", models, scale=0.05, batch_size=4, progress=False)
    text = report.read_text()
    assert text.count("data:image/png;base64") >= 2 * len(PLAN)
    assert "native:" in text and "non-native:" in text
    for label in models:
        for name, _, _ in PLAN:
            assert (tmp_path / "demo" / label / name / "report.html").exists()


def test_verdict_follows_the_numbers():
    rows = []
    for model, eoi, image in (("gate", 0.2, 0.9), ("spread", 0.95, 0.3), ("flat", 1.0, 0.98), ("dead", 0, 0)):
        for cond, rel in (("baseline", 1.0), ("eoi->text", eoi), ("image->text", image)):
            score = 0.0 if model == "dead" else 0.5 * rel
            rows.append({"model": model, "task": "vqa", "metric": "m", "condition": cond, "score": score, "relative": rel})
    v = verdict(pd.DataFrame(rows))
    assert "narrow gate" in v["gate"] and "distributed" in v["spread"]
    assert "neither" in v["flat"] and "near zero" in v["dead"]
