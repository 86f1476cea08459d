"""Data parallel: the same command under torchrun (2 CPU processes, gloo) gives the single-process tables."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from narrowgate.cli import app
from narrowgate.store import RunStore

CASES = {
    "ablation": ["--task", "captions", "-n", "6", "--max-new-tokens", "4"],
    "patching": ["--n-per-class", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(CASES))
def test_torchrun_two_processes_equal_one(experiment, checkpoint_dir, tmp_path):
    # the ablation needs a model above chance (a random checkpoint's is refused): the shipped organism
    model = "native" if experiment == "ablation" else str(checkpoint_dir("chameleon"))
    args = ["run", experiment, "--model", model, "--data", "synthetic", *CASES[experiment], "--quiet"]
    single, double = tmp_path / "single", tmp_path / "double"
    assert CliRunner().invoke(app, [*args, "--out", str(single)]).exit_code == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # same kernels as this process: bitwise-equal results
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "narrowgate.cli",
        *args,
        "--out",
        str(double),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted(p.name for p in (double / "records").glob("*.parquet"))
    assert any(p.startswith("part-0-") for p in parts) and any(p.startswith("part-1-") for p in parts)
    a, b = RunStore(single), RunStore(double)
    ids_b = b.records().rows["example_id"]
    assert ids_b.is_unique and sorted(ids_b) == sorted(a.records().rows["example_id"])
    for name, table in a.tables().items():
        pd.testing.assert_frame_equal(table, b.tables()[name])
    assert (double / "report.html").exists()


def test_rank_shards_and_gpu_groups():
    from narrowgate.distributed import Ranks

    units = list(range(10))
    shards = [Ranks(r, 3, r).shard(units) for r in range(3)]
    assert sorted(sum(shards, [])) == units and shards[1] == [1, 4, 7]
    assert Ranks(1, 4, 1).gpus(8, 4) == [2, 3]
    assert Ranks(0, 8, 0).gpus(8, 8) == [0]
    with pytest.raises(ValueError, match="GPUs"):
        Ranks(0, 4, 0).gpus(2, 4)
