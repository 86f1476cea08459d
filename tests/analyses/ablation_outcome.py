"""The outcome an ablation run must have, computed independently of the runner from its own records.

A random-weight test checkpoint usually answers at chance, where the ablation refuses its relative scores;
tests that run the ablation on one check the outcome the records call for: the table when the baseline
beats chance, else the one-line refusal naming both numbers (and the records kept either way).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from narrowgate.analyses.base import TASK_OF
from narrowgate.data import tasks
from narrowgate.metrics import cider, cider_chance, neighborhood_overlap, overlap_chance, vqa_accuracy, vqa_chance
from narrowgate.store import RunStore


def baseline_and_chance(out: Path) -> tuple[float, float]:
    """The baseline's score and its chance level, recomputed from the run's records and its data."""
    cfg = json.loads((out / "manifest.json").read_text())["config"]
    task = cfg.get("task") or TASK_OF[cfg["data"]]
    records = RunStore(out).records()
    rows = records.rows
    if task == "classes":
        labels = rows["label"].tolist()
        k = min(cfg["k"], min(Counter(labels).values()) - 1)
        x = np.asarray(records.arrays["last:baseline"], dtype=np.float32)
        return neighborhood_overlap(x, labels, k=k), overlap_chance(labels)
    sample = {k: cfg[k] for k in ("n", "n_per_class") if k in cfg}
    examples = tasks.load(
        cfg["data"], task, cfg.get("data_dir"), seed=cfg["seed"], allow_fewer=bool(cfg.get("allow_fewer")), **sample
    )
    by_id = {e.id: e for e in examples}
    preds = dict(zip(rows["example_id"], rows["pred:baseline"]))
    if task == "vqa":
        score = float(np.mean([vqa_accuracy(p, by_id[i].answers) for i, p in preds.items()]))
        groups = {i: by_id[i].meta.get("question_type") or by_id[i].question for i in preds}
        return score, vqa_chance(preds, {i: by_id[i].answers for i in preds}, groups)
    refs = {i: list(by_id[i].references) for i in preds}
    tokenize = cfg.get("cider_tokenize", "ptb")
    return cider(preds, refs, tokenize=tokenize)[0], cider_chance(preds, refs, seed=cfg["seed"], tokenize=tokenize)


def check_ablation_outcome(result, out: Path) -> bool:
    """Assert the CLI ``result`` of an ablation into ``out`` is what its records call for; True if it has a table."""
    score, chance = baseline_and_chance(out)
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("Loading weights")]
    if score > chance:
        assert result.exit_code == 0, result.output
        table = pd.read_csv(out / "tables" / "ablation.csv").set_index("condition")
        assert abs(table.loc["baseline", "score"] - score) < 1e-9
        assert abs(table["chance"].iloc[0] - chance) < 1e-9
        return True
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "at or below chance" in lines[0] and f"{score:.4f}" in lines[0] and f"{chance:.4f}" in lines[0]
    assert not (out / "tables" / "ablation.csv").exists()
    return False
