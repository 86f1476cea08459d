"""Issue 23 items 6, 8, 10 and 11 for fine-tuning: its run directory is locked and fingerprinted like a run's,
an adapter refuses a base it was not trained on, a failed start leaves --out usable, and one bad example costs
that example alone."""

from __future__ import annotations

import json
import shutil

import pytest

import narrowgate as ng
from narrowgate.finetune import BASE_FILE, finetune, load_adapted
from narrowgate.loading import LoadError
from narrowgate.store import ManifestMismatch, RunLocked, RunStore
from tests.fixtures import chameleon

#: transformers' own progress bars while it loads or writes weights (not narrowgate's output).
HF_PROGRESS = ("Loading weights", "Writing model shards")
TINY = dict(samples={"synthetic": 24}, steps=2, batch_size=4, micro_batch=4, lr=1e-2, heldout=4, progress=False)


# --- item 8: the lock and the fingerprint ---------------------------------------------------------------------
def test_a_second_finetune_on_the_same_out_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "ft"
    holder = RunStore(out)
    holder.lock("narrowgate finetune --out ft (the first one)")
    try:
        with pytest.raises(RunLocked, match=r"in use by another run .*the first one"):
            finetune(str(tmp_path / "no-model"), "remove-gate", {"synthetic": None}, out, **TINY)
    finally:
        holder.unlock()
    assert not (out / "manifest.json").exists()


@pytest.fixture
def base(tmp_path):
    """A tiny Chameleon checkpoint of its own (the tests replace its weights)."""
    path = tmp_path / "base"
    chameleon.build(path, seed=0)
    return path


@pytest.mark.slow
def test_resume_on_a_replaced_base_is_refused(base, tmp_path):
    out = tmp_path / "ft"
    finetune(str(base), "remove-gate", {"synthetic": None}, out, **TINY)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"] == ng.loading.fingerprint(base)
    assert (out / "lock").read_text() == ""  # released
    chameleon.build(base, seed=1)  # same architecture and path, other weights
    with pytest.raises(ManifestMismatch, match="different fingerprint"):
        finetune(str(base), "remove-gate", {"synthetic": None}, out, **TINY)


# --- item 6: an adapter refuses a base it was not trained on -------------------------------------------------
@pytest.mark.slow
def test_load_adapted_refuses_an_adapter_trained_on_another_model(base, tmp_path, checkpoint_dir):
    out = tmp_path / "ft"
    finetune(str(base), "remove-gate", {"synthetic": None}, out, **TINY)
    adapter = out / "adapter"
    assert json.loads((adapter / BASE_FILE).read_text())["fingerprint"] == ng.loading.fingerprint(base)
    load_adapted(base, adapter, dtype="float32")  # its own base: fine
    # Another architecture (LLaVA): with or without the record, refused instead of returning the plain base.
    with pytest.raises(LoadError, match="trained on"):
        load_adapted(checkpoint_dir("llava"), adapter)
    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(adapter, unrecorded)
    (unrecorded / BASE_FILE).unlink()
    with pytest.raises(LoadError, match="does not fit .* trained on another model"):
        load_adapted(checkpoint_dir("llava"), unrecorded)
    # The same architecture with other weights: only the recorded fingerprint can tell, and it does.
    other = tmp_path / "other"
    chameleon.build(other, seed=1)
    with pytest.raises(LoadError, match=r"was trained on .*base.*fingerprint differs: model.safetensors"):
        load_adapted(other, adapter)


# --- item 10: a failed start leaves --out usable -------------------------------------------------------------
def _cli(*args):
    from typer.testing import CliRunner

    from narrowgate.cli import app

    return CliRunner().invoke(app, ["finetune", *args, "--quiet"])


def _one_line_error(result, *needles):
    assert result.exit_code not in (0, None), result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith(HF_PROGRESS)]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


SMALL = ["--steps", "2", "--batch-size", "4", "--micro-batch", "4", "--heldout", "4", "--lr", "1e-2"]


@pytest.mark.slow
def test_missing_data_or_a_knockout_beyond_the_model_writes_nothing_and_the_fix_runs(base, tmp_path):
    out = tmp_path / "ft"
    model = ["--model", str(base), "--recipe", "remove-gate", "--out", str(out), *SMALL]
    missing = _cli(*model, "--data", f"vqav2={tmp_path / 'nowhere'}", "--samples", "llava-instruct=0")
    _one_line_error(missing, "--data vqav2", "nowhere")
    assert not out.exists()
    data = ["--data", "synthetic", "--samples", "synthetic=24"]
    beyond = _cli(*model, *data, "--knockout", "eoi->text@7")
    _one_line_error(beyond, "--knockout eoi->text@7", "3 decoder layers")
    assert not (out / "manifest.json").exists()
    fixed = _cli(*model, *data)
    assert fixed.exit_code == 0, fixed.output
    assert json.loads((out / "card.json").read_text())["knockouts"] == ["eoi->text"]


# --- item 11: one bad example costs that example --------------------------------------------------------------
@pytest.mark.slow
def test_a_bad_training_example_is_a_failure_record_and_the_run_goes_on(base, tmp_path):
    from tests.data import train_layouts

    root = train_layouts.llava_instruct(tmp_path / "llava", n=16, answers={5: "It is <image> here."})
    settings = dict(TINY, samples={"llava-instruct": 12, "vqav2": 0}, steps=3)
    out = tmp_path / "ft"
    card = finetune(str(base), "remove-gate", {"llava-instruct": str(root)}, out, **settings)
    failures = RunStore(out).failures()
    assert failures["example_id"].tolist() == [f"llava-instruct:{5:012d}-0"]
    assert "Image features and image tokens do not match" in failures["reason"].iloc[0]
    assert card["failures"]["by_source"] == {"llava-instruct": 1} and card["steps"] == 3
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "1 example" in (out / "CARD.md").read_text()
    again = finetune(str(base), "remove-gate", {"llava-instruct": str(root)}, out, **settings)  # resumes
    assert again["loss"] == card["loss"] and len(RunStore(out).failures()) == 1
