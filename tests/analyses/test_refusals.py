"""Issue 23: option combinations that would measure something other than what was asked are refused
on one line, before the model loads or anything is written (or, when only the model can tell, before
the manifest), and the corrected command then runs on the same --out."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from narrowgate.analyses import EXPERIMENTS
from narrowgate.analyses.options import check_sweep
from narrowgate.cli import app
from narrowgate.errors import OptionError
from narrowgate.store import RunStore

runner = CliRunner()


def _one_line_refusal(result, text: str | None = None) -> None:
    """Refused on one ``Error:`` line (containing ``text``), no traceback; the only other output a model load's bar."""
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    if text:
        assert text in lines[0], lines[0]


def _ablation(out, *options: str):
    args = ["run", "ablation", "--model", "native", "--data", "synthetic", "--task", "vqa", "--n", "2"]
    return runner.invoke(app, [*args, "--max-new-tokens", "2", "--out", str(out), "--quiet", *options])


def test_sweep_with_layers_is_refused_not_ignored(tmp_path):
    out = tmp_path / "run"
    result = _ablation(out, "--sweep", "--layers", "0-1")
    _one_line_refusal(result, "--layers 0-1")
    assert "--sweep" in result.output and not out.exists()
    result = _ablation(out, "--sweep-step", "2")  # --sweep-step alone would be ignored just as silently
    _one_line_refusal(result, "--sweep-step 2 applies only with --sweep")
    assert not out.exists()


@pytest.mark.parametrize("experiment", ["ablation", "overlap"])
def test_only_a_sweep_step_other_than_the_default_needs_sweep(experiment):
    """Overlap's default step is the authors' 4, the ablation's 1: a run without --sweep keeps either default."""
    exp = EXPERIMENTS[experiment]()
    default = exp.defaults["sweep_step"]
    check_sweep(exp.config(), default)
    with pytest.raises(OptionError, match=f"--sweep-step {default + 1} applies only with --sweep"):
        check_sweep(exp.config(sweep_step=default + 1), default)


def test_sweep_step_beyond_the_model_is_refused_before_the_manifest(tmp_path):
    out = tmp_path / "run"
    result = _ablation(out, "--sweep", "--sweep-step", "100")
    _one_line_refusal(result, "--sweep-step 100 is more than the model's 4 decoder layers")
    assert not (out / "manifest.json").exists()
    args = ["run", "overlap", "--model", "native", "--data", "synthetic", "--n-per-class", "3", "--k", "2"]
    result = runner.invoke(app, [*args, "--sweep", "--sweep-step", "9", "--out", str(tmp_path / "o"), "--quiet"])
    _one_line_refusal(result, "--sweep-step 9 is more than")
    assert not (tmp_path / "o" / "manifest.json").exists()
    good = _ablation(out, "--sweep", "--sweep-step", "2")
    assert good.exit_code == 0, good.output
    conditions = set(RunStore(out).tables()["ablation"]["condition"])
    assert {"eoi->text@2-3", "eoi->text@0-3"} <= conditions and len(conditions) == 1 + 2 * 4


def test_a_gpu_device_map_without_a_gpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device_map in ("cuda:0", "cuda", '{"": 0}'):
        result = _ablation(tmp_path / "run", "--device-map", device_map)
        _one_line_refusal(result, f"--device-map {device_map} names a GPU, but torch sees none")
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _one_line_refusal(_ablation(tmp_path / "run", "--device-map", "cuda:5"), "names GPU 5, but this machine has 2")
    assert not (tmp_path / "run").exists()


def test_modality_gap_sample_below_what_the_clustering_needs_is_refused(tmp_path):
    args = ["run", "modality-gap", "--model", "native", "--data", "synthetic", "--out", str(tmp_path / "r"), "--quiet"]
    result = runner.invoke(app, [*args, "--n", "5"])
    _one_line_refusal(result, "--n 5 gives 10 points per layer")
    assert "--n 9 or more" in result.output and not (tmp_path / "r").exists()
    result = runner.invoke(app, [*args, "--n", "9"])
    assert result.exit_code == 0, result.output
    assert len(RunStore(tmp_path / "r").tables()["modality_gap"]) == 5  # resid 0..4
