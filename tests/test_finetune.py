"""`narrowgate finetune` end to end on tiny checkpoints: both recipes, loss down, adapter and merged model back."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import narrowgate as ng
from narrowgate import checkpoint_prompts
from narrowgate.analyses import EXPERIMENTS
from narrowgate.cli import app
from narrowgate.data.prompts import CAPTION, PRESETS
from narrowgate.finetune import RECIPES, finetune, load_adapted
from narrowgate.runner import run
from tests.fixtures.common import images

pytestmark = pytest.mark.slow  # minutes: demo runs, fine-tuning, the paper datasets' layouts

TINY = dict(samples={"synthetic": 72}, steps=8, batch_size=8, micro_batch=4, lr=1e-2, heldout=8, progress=False)


def _logits(vlm):
    batch = vlm.prepare(images(2, seed=5), ["What color is the shape?"] * 2)
    return vlm.forward(batch).logits


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_end_to_end(checkpoint_dir, tmp_path, recipe):
    base = checkpoint_dir("chameleon")
    out = tmp_path / "ft"
    card = finetune(str(base), recipe, {"synthetic": None}, out, merge=True, **TINY)
    losses = pd.read_csv(out / "tables" / "loss.csv")["loss"].to_numpy()
    assert len(losses) == 8 and losses[-2:].mean() < losses[:2].mean()
    assert card["knockouts"] == list(RECIPES[recipe].knockouts)
    after, before = card["heldout"]["after"]["baseline"], card["heldout"]["before"]["baseline"]
    assert after["loss"] < before["loss"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "manifest.json").read_text())["experiment"] == "finetune"
    # The adapter loads back onto the base model, and equals the merged checkpoint.
    adapted, merged = load_adapted(base, out / "adapter", dtype="float32"), ng.load(out / "merged", dtype="float32")
    plain = ng.load(base, dtype="float32")
    torch.testing.assert_close(_logits(adapted), _logits(merged), atol=1e-4, rtol=0)
    assert (_logits(plain) - _logits(merged)).abs().max() > 1e-3
    # The merged checkpoint is a normal checkpoint: an experiment runs on it, asking the prompts it was tuned on.
    store = run(
        EXPERIMENTS["overlap"](),
        dict(model=str(out / "merged"), data="synthetic", n_per_class=3, k=2, out=str(tmp_path / "ov"), progress=False),
        command=["test"],
    )
    assert len(store.tables()["overlap"]) > 0
    tuned = checkpoint_prompts.read(out / "merged")
    assert tuned.prompts == {"vqa": PRESETS[("chameleon", None, "vqa", None)], "captions": CAPTION}
    assert card["prompts"] == {"captions (synthetic)": CAPTION, "vqa (synthetic)": tuned.prompts["vqa"]}
    # Rerunning the same command resumes from the last checkpoint: nothing left to do, same losses.
    again = finetune(str(base), recipe, {"synthetic": None}, out, merge=True, **TINY)
    assert again["loss"] == card["loss"]


def test_resume_continues_where_it_stopped(checkpoint_dir, tmp_path, monkeypatch):
    """A run stopped after a checkpoint and rerun ends with the losses of an uninterrupted run."""
    import narrowgate.finetune as ft

    base = str(checkpoint_dir("chameleon"))
    full = finetune(base, "remove-gate", {"synthetic": None}, tmp_path / "full", save_every=4, **TINY)
    real = ft._save_state

    def stop_after_first(path, model, opt, step, losses):
        real(path, model, opt, step, losses)
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "_save_state", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        finetune(base, "remove-gate", {"synthetic": None}, tmp_path / "cut", save_every=4, **TINY)
    monkeypatch.setattr(ft, "_save_state", real)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 4
    resumed = finetune(base, "remove-gate", {"synthetic": None}, tmp_path / "cut", save_every=4, **TINY)
    assert resumed["loss"]["final"] == pytest.approx(full["loss"]["final"], rel=1e-4)


def test_cli_finetune_and_bad_input(checkpoint_dir, tmp_path):
    runner = CliRunner()
    base = str(checkpoint_dir("chameleon"))
    args = [
        "finetune",
        "--model",
        base,
        "--recipe",
        "remove-gate",
        "--data",
        "synthetic",
        "--samples",
        "synthetic=24",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--heldout",
        "4",
        "--quiet",
        "--knockout",
        "image->eoi+text:mask",
    ]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "image->eoi+text:mask" in result.output
    bad = runner.invoke(
        app, ["finetune", "--model", base, "--recipe", "nope", "--data", "synthetic", "--out", str(tmp_path / "bad")]
    )
    assert bad.exit_code != 0 and "--recipe 'nope' is not a recipe" in bad.output
    missing = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            base,
            "--recipe",
            "remove-gate",
            "--data",
            "synthetic",
            "--out",
            str(tmp_path / "bad2"),
        ],
    )
    assert missing.exit_code != 0 and "--samples synthetic=N" in missing.output


def test_knockout_parse_inverts_name():
    for k in (
        ng.Knockout("eoi", "text"),
        ng.Knockout("image", ("eoi", "text"), mode="mask", layers=(0, 1, 2)),
        ng.Knockout(("eoi", "last_image"), "text", layers=(1, 3)),
    ):
        assert ng.Knockout.parse(k.name) == k
    with pytest.raises(ValueError, match="SRC->TGT"):
        ng.Knockout.parse("eoi")


def test_cli_in_a_log_prints_progress_lines_and_no_dependency_deprecations(tmp_path):
    """`narrowgate finetune > log 2>&1`: plain progress lines for every phase, and nothing of transformers' own
    deprecations (peft reads its deprecated `is_gradient_checkpointing`, a FutureWarning Python always shows)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS")}
    args = ["finetune", "--model", "gated", "--recipe", "remove-gate", "--data", "synthetic"]
    args += ["--samples", "synthetic=24", "--steps", "2", "--batch-size", "4", "--micro-batch", "4", "--heldout", "4"]
    cli = [sys.executable, "-c", "from narrowgate.cli import main; main()"]
    done = subprocess.run([*cli, *args, "--out", str(tmp_path / "ft")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    assert "Warning" not in log and "is_gradient_checkpointing" not in log, log
    assert "Loading weights" not in log  # transformers' \r-redrawn bars stay out of a log
    for line in (  # three conditions: baseline, eoi->text and its mask-mode check
        "held-out scores before training (conditions): 0/3 (0%), 0:00:00 elapsed",
        "finetune remove-gate: 0/2 (0%), loss -, 0:00:00 elapsed",
        "held-out scores after training (conditions): 0/3 (0%), 0:00:00 elapsed",
    ):
        assert line in log.splitlines(), log
    assert re.search(r"^finetune remove-gate: 2/2 \(100%\), loss [0-9.]+, \d:\d\d:\d\d elapsed, finished$", log, re.M)
