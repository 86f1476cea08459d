"""The coverage matrix script in reduced form: families whose attention the engine first met there pass every check."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "coverage.py"
#: Sliding-window + global layers, bidirectional image attention and soft-capping (gemma3), a bidirectional
#: prefix-LM prompt (paligemma), M-RoPE and deepstack (qwen3_vl), pixel-shuffled tiles (internvl), multi-head latent
#: attention with values narrower than keys, whose cache holds the latent (kimi_k25), Gated DeltaNet layers beside
#: attention (qwen3_5, a hybrid decoder).
TYPES = ("gemma3", "paligemma", "qwen3_vl", "internvl", "kimi_k25", "qwen3_5")


@pytest.fixture(scope="module")
def coverage():
    spec = importlib.util.spec_from_file_location("narrowgate_coverage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_reduced_matrix_passes_every_check(coverage, capsys):
    coverage.main(["--types", ",".join(TYPES), "--markdown"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"coverage: {len(TYPES)} of {len(TYPES)} model types pass every check"
    rows = {cells[0]: cells for cells in ([c.strip() for c in l.strip("|").split("|")] for l in lines[2:-1])}
    assert lines[0] == "| model type | roles | checks passed | why not |" and set(rows) == set(TYPES)
    for t in TYPES:
        assert rows[t][1] == "generic" and rows[t][2].startswith("all"), rows[t]
    assert rows["gemma3"][2] == "all + softcap"


def test_out_of_scope_and_unknown_types(coverage, capsys):
    coverage.main(["--types", "mllama"])
    out = capsys.readouterr().out.strip().splitlines()
    assert re.match(r"mllama +out of scope .*cross-attention", out[0])
    assert out[-1] == "coverage: 0 of 1 model types pass every check"
    with pytest.raises(SystemExit):
        coverage.main(["--types", "not_a_type"])
