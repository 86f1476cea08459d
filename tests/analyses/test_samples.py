"""Issue 23, item 3: a sample is never cut silently, and a small sample's numbers carry their uncertainty.

`--n` beyond what the synthetic classes hold, or an ImageNet copy with a class folder empty, stops
with the count unless `--allow-fewer`; every ablation score has its standard error over the examples
(checked against an independent computation), a sample below 25 examples is announced before the
model loads, and a single example (no standard error; CIDEr-D 0 by construction) is refused.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from narrowgate.analyses import EXPERIMENTS
from narrowgate.cli import app
from narrowgate.data import animal_classes, tasks
from narrowgate.errors import DataError
from narrowgate.runner import run
from narrowgate.store import RunStore
from tests.analyses.test_refusals import _one_line_refusal
from tests.data import layouts

runner = CliRunner()


def _classes(out, *options):
    args = ["run", "ablation", "--model", "native", "--data", "synthetic", "--task", "classes", "--out", str(out)]
    return runner.invoke(app, [*args, "--quiet", *options])


def test_n_beyond_the_synthetic_classes_is_refused_unless_allowed(tmp_path):
    result = _classes(tmp_path / "r", "--n-per-class", "3", "--k", "1", "--n", "50")
    _one_line_refusal(result, "Asked for 50 examples but the synthetic classes at --n-per-class 3 have 18")
    assert "--allow-fewer" in result.output and not (tmp_path / "r").exists()
    result = _classes(tmp_path / "r", "--n-per-class", "3", "--k", "1", "--n", "50", "--allow-fewer")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["data"]["requested"] == {"n_per_class": 3, "n": 50}
    assert manifest["data"]["actual"]["examples"] == 18 == len(RunStore(tmp_path / "r").records().rows)


def test_an_empty_imagenet_class_folder_is_refused_unless_allowed(tmp_path):
    root = layouts.imagenet(tmp_path / "imagenet", train=2, val=0)
    gone = animal_classes()[7].wnid
    shutil.rmtree(root / "train" / gone)
    (root / "train" / gone).mkdir()  # the folder is there, its images are not
    with pytest.raises(DataError, match=rf"1 of the 100 'animals' classes have no image in .*train \(e.g. {gone}\)"):
        tasks.load("imagenet", "classes", root, n_per_class=2, seed=0)
    examples = tasks.load("imagenet", "classes", root, n_per_class=2, seed=0, allow_fewer=True)
    labels = {e.label for e in examples}
    assert len(labels) == 99 and gone not in labels and len(examples) == 198


def _overlap_per_point(X: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Independent reference: float64 brute-force distances, the point itself excluded."""
    X = X.astype(np.float64)
    d = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1, kind="stable")[:, :k]
    return (labels[nearest] == labels[:, None]).mean(1)


def test_small_classes_sample_is_announced_and_every_score_has_its_standard_error(tmp_path, caplog):
    # The reported case: 6 synthetic classes x 2 images, k = 1.
    out = tmp_path / "r"
    with caplog.at_level(logging.WARNING, logger="narrowgate.run"):
        store = run(
            EXPERIMENTS["ablation"](),
            dict(model="native", data="synthetic", task="classes", n_per_class=2, k=1, out=str(out), progress=False),
        )
    assert "a sample of 12 examples is small" in caplog.text and "up to 0.14" in caplog.text
    table = store.tables()["ablation"].set_index("condition")
    records = store.records()
    labels = records.rows["label"].to_numpy()
    base = _overlap_per_point(np.asarray(records.arrays["last:baseline"], np.float64), labels, 1)
    for condition, row in table.iterrows():
        per = _overlap_per_point(np.asarray(records.arrays[f"last:{condition}"], np.float64), labels, 1)
        assert row["score"] == pytest.approx(per.mean())
        assert row["se"] == pytest.approx(per.std(ddof=1) / np.sqrt(12))
        assert row["relative"] == pytest.approx(per.mean() / base.mean())
        # the ratio's standard error, by brute force: the spread of the ratio over leave-one-out resamples
        # (jackknife), which agrees with the delta method to first order
        loo = np.array([np.delete(per, i).mean() / np.delete(base, i).mean() for i in range(12)])
        jackknife = np.sqrt(11 / 12 * ((loo - loo.mean()) ** 2).sum())
        assert row["relative_se"] == pytest.approx(jackknife, rel=0.25, abs=1e-9)
    assert table.loc["baseline", "relative_se"] == 0.0 and table.loc["baseline", "se"] > 0


def test_a_single_example_is_refused(tmp_path):
    args = ["run", "ablation", "--model", "native", "--data", "synthetic", "--task", "captions", "--n", "1"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "r"), "--quiet"])
    _one_line_refusal(result, "--n 1: a score over one example has no standard error")
    assert not (tmp_path / "r").exists()
