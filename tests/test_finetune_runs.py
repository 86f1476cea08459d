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
