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
    rows = {cells[0]: cells for cells in ([c.strip() for c in l.strip("|").split("|")] for l in lines[2:-3])}
    assert lines[0] == "| model type | roles | checks passed | multi-image | video | why not |"
    assert set(rows) == set(TYPES)
    for t in TYPES:
        assert rows[t][1] == "generic" and rows[t][2].startswith("all"), rows[t]
        assert rows[t][3] == "yes", rows[t]  # multi-image
    assert rows["gemma3"][2] == "all + softcap"
    for t in ("gemma3", "paligemma"):  # their processors take no video: not applicable, not a failure
        assert rows[t][4].startswith("n/a — the architecture takes no video"), rows[t]
    assert lines[-3] == f"multi-image: {len(TYPES)} of {len(TYPES)} model types pass"


def test_out_of_scope_and_unknown_types(coverage, capsys):
    coverage.main(["--types", "mllama"])
    out = capsys.readouterr().out.strip().splitlines()
    assert re.match(r"mllama +out of scope .*cross-attention", out[0])
    assert out[-1] == "coverage: 0 of 1 model types pass every check"
    with pytest.raises(SystemExit):
        coverage.main(["--types", "not_a_type"])


def _cells(coverage, model_type: str) -> tuple[tuple, list[str]]:
    sent = []
    coverage._run_type(model_type, sent.append)
    return sent[0], sent[1:]


def test_columns_pass_on_a_family_with_several_images_and_video(coverage):
    (how, passed, why), cells = _cells(coverage, "qwen2_vl")
    assert (how, passed, why) == ("dedicated", list(coverage.CHECKS), "")
    assert cells == ["yes", "yes"]


def test_columns_show_a_refusal_and_no_video_apart_from_a_failure(coverage, monkeypatch):
    (_, passed, why), cells = _cells(coverage, "emu3")
    assert passed == list(coverage.CHECKS) and not why
    assert cells[0] == "refused: The emu3 adapter lays out one image per prompt; give one image per example."
    assert cells[1] == "n/a — the architecture takes no video (Emu3Processor takes no video)"

    def wrong(vlm):
        raise AssertionError("text logits of two first images under the image@1 knockout differ by 1.0e-01")

    monkeypatch.setattr(coverage.several, "check_image_blind", wrong)
    _, cells = _cells(coverage, "qwen2_vl")
    assert cells == [
        "fails: AssertionError: text logits of two first images under the image@1 knockout differ by 1.0e-01",
        "yes",
    ]


def test_tally_counts_each_kind_of_cell(coverage):
    cells = [
        "yes",
        "yes",
        "n/a — the architecture takes no video (X takes no video)",
        "refused: one",
        "fails: E: x",
        "—",
    ]
    assert coverage._tally(cells) == "2 of 6 model types pass (1 n/a, 1 refused, 1 fail, 1 not reached)"
    assert coverage._tally(["yes"]) == "1 of 1 model types pass"
