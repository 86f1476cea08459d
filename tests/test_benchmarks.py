"""The fine-tuning benchmark runs end to end (its tiny config), so a lent GPU's minutes are not spent on its bugs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune.py"


def _module():
    spec = importlib.util.spec_from_file_location("finetune_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_benchmark_reports_step_time_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    result = _module().main(
        ["--config", "tiny", "--steps", "2", "--batch-size", "4", "--micro-batch", "2", "--json", str(out)]
    )
    assert out.is_file()
    assert result["steps"] == 2 and result["batch_size"] == 4 and result["image_tokens"] == 64
    assert result["seconds_per_step"] > 0 and result["peak_memory_mib"] >= result["memory_before_training_mib"] > 0
    assert all(math.isfinite(x) for x in result["loss_first_final"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_finetune_benchmark_7b_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        _module().main(["--config", "7b"])
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_scaling_benchmark_measures_every_analysis_at_every_size(tmp_path):
    """The tiny config end to end: one row per analysis and size, ratios to the plain forward, slopes, the figure."""
    spec = importlib.util.spec_from_file_location("scaling_benchmark", SCRIPT.parent / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = scaling  # its dataclasses look their module up
    spec.loader.exec_module(scaling)
    out, fig = tmp_path / "scaling.json", tmp_path / "scaling.png"
    result = scaling.main(["--config", "tiny", "--json", str(out), "--figure", str(fig)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result)) and fig.stat().st_size > 0
    sizes = scaling.CONFIGS["tiny"][0].sizes
    rows = {(r["analysis"], r["image_tokens"]): r for r in result["rows"]}
    assert set(rows) == {(a, s) for a in scaling.ANALYSES for s in sizes} and set(result["slopes"]) == set(
        scaling.ANALYSES
    )
    for (_, size), r in rows.items():
        assert math.isfinite(r["time_ratio"]) and r["time_ratio"] > 0 and r["seconds"] > 0
        assert r["sequence_length"] > size and r["scan_positions"] == size + 2  # BOI, the image, [EOI]
    assert rows[("forward", sizes[-1])]["time_ratio"] == 1 and rows[("forward", sizes[-1])]["memory_ratio"] == 1
    assert rows[("forward", sizes[-1])]["peak_mib"] > 0
    assert all(math.isfinite(v) for v in result["slopes"].values())


@pytest.mark.slow
def test_engine_benchmark_runs_every_workload(tmp_path):
    """Its tiny config runs every workload (R1-R6) end to end; the ratios are measured on a quiet machine."""
    spec = importlib.util.spec_from_file_location("engine_benchmark", SCRIPT.parent / "engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "engine.json"
    result = module.main(["--config", "tiny", "--repeats", "1", "--new-tokens", "3", "--json", str(out)])
    assert out.is_file()
    assert set(module.TARGETS) <= set(result)
    assert set(result["R6_sites"]) == {"resid", "attn_out", "mlp_out", "head", "pattern"}
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in module.TARGETS)
