"""A run survives SIGKILL (resume gives the same tables, no duplicate or missing id) and bad examples."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from narrowgate.cli import app
from narrowgate.store import RunStore
from tests.analyses.ablation_outcome import check_ablation_outcome
from tests.data.helpers import CORRUPT_BYTES, write_jpeg

N = 16


def _args(model: Path, out: Path) -> list[str]:
    return [
        "run",
        "ablation",
        "--model",
        str(model),
        "--data",
        "synthetic",
        "--task",
        "captions",
        "--n",
        str(N),
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
        "--quiet",
    ]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_tables(tmp_path):
    model = Path("native")  # the shipped organism captions above chance (a random checkpoint's ablation is refused)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "narrowgate.cli", *_args(model, killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list((killed / "records").glob("*.parquet"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = RunStore(killed).done_ids()
    assert 0 < len(partial) < N
    runner = CliRunner()
    assert runner.invoke(app, _args(model, killed)).exit_code == 0
    fresh = tmp_path / "fresh"
    assert runner.invoke(app, _args(model, fresh)).exit_code == 0
    a, b = RunStore(killed), RunStore(fresh)
    ids = a.records().rows["example_id"]
    assert ids.is_unique and len(ids) == N and set(ids) == set(b.records().rows["example_id"])
    pd.testing.assert_frame_equal(a.tables()["ablation"], b.tables()["ablation"])
    pd.testing.assert_frame_equal(a.records().rows, b.records().rows)


def test_bad_examples_are_recorded_and_the_run_completes(checkpoint_dir, tmp_path):
    root = tmp_path / "flickr"
    lines = []
    for i in range(5):
        name = f"{1000 + i}.jpg"
        if i == 1:
            (root / "flickr30k-images").mkdir(parents=True, exist_ok=True)
            (root / "flickr30k-images" / name).write_bytes(CORRUPT_BYTES)
        elif i != 3:  # image 3 is missing
            write_jpeg(root / "flickr30k-images" / name, color=(40 * i, 90, 200 - 30 * i), size=(32, 32))
        lines += [f"{name}#{j}\ta picture number {i} with caption {j}" for j in range(5)]
    (root / "results_20130124.token").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "run",
            "ablation",
            "--model",
            str(checkpoint_dir("chameleon")),
            "--data",
            "flickr30k",
            "--data-dir",
            str(root),
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
            "--allow-fewer",
            "--quiet",
        ],
    )
    finished = check_ablation_outcome(result, out)  # a random checkpoint may caption at chance: then refused
    store = RunStore(out)
    failures = store.failures()
    assert set(failures["example_id"]) == {"1001", "1003"}
    reasons = dict(zip(failures["example_id"], failures["reason"]))
    assert "corrupt" in reasons["1001"] and "missing" in reasons["1003"]
    assert len(store.records().rows) == 3
    if finished:
        assert set(store.tables()["ablation"]["n"]) == {3} and len(store.tables()["failures"]) == 2
