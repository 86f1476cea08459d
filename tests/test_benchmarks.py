"""The fine-tuning benchmark runs end to end (its tiny config), so a lent GPU's minutes are not spent on its bugs."""

from __future__ import annotations

import importlib.util
import math
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
