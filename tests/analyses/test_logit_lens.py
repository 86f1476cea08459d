"""Logit lens: the read-out at the last residual index is the model's own next-token distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from narrowgate import Capture
from narrowgate.analyses.logit_lens import read_out, suppressed
from narrowgate.cli import app
from narrowgate.data import tasks
from narrowgate.data.prompts import name_ids
from narrowgate.store import RunStore
from tests.fixtures.common import images


@pytest.mark.parametrize("family", ["chameleon", "llava", "qwen2_vl"])
def test_last_read_out_equals_the_models_own_distribution(loaded, family):
    vlm = loaded(family)
    batch = vlm.prepare(images(2, seed=2), ["This shape is a"] * 2)
    out = vlm.forward(batch, capture=Capture("last"))
    never = suppressed(out.logits[:, -1])
    assert never.any() == (family == "chameleon")  # Chameleon never predicts its image codes
    lens = read_out(vlm, out.residuals["last"][:, -1], never)
    want = torch.log_softmax(out.logits[:, -1].float(), -1)
    torch.testing.assert_close(lens[:, ~never], want[:, ~never], atol=1e-5, rtol=0)


def test_logit_lens_run_reports_the_class_token_per_resid(checkpoint_dir, loaded, tmp_path):
    out = tmp_path / "lens"
    args = [
        "run",
        "logit-lens",
        "--model",
        str(checkpoint_dir("chameleon")),
        "--data",
        "synthetic",
        "--n-per-class",
        "2",
        "--out",
        str(out),
        "--quiet",
        "--batch-size",
        "4",
    ]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    table = RunStore(out).tables()["logit_lens"]
    vlm = loaded("chameleon")
    L = vlm.n_layers
    assert set(table["role"]) == {"eoi", "last"} and sorted(table["resid"].unique()) == list(range(L + 1))
    examples = tasks.load("synthetic", "classes", None, seed=42, n_per_class=2)
    batch = vlm.prepare([e.load_image() for e in examples], ["This shape is a"] * len(examples))
    logp = torch.log_softmax(vlm.forward(batch).logits[:, -1].float(), -1)
    first = torch.tensor([name_ids(vlm.family.tokenizer, e.word)[0] for e in examples])
    own = logp.gather(1, first[:, None])[:, 0]
    last = table[(table["role"] == "last") & (table["resid"] == L)].iloc[0]
    assert last["logp"] == pytest.approx(float(own.mean()), abs=1e-4)
    assert last["top1"] == pytest.approx(float((logp.argmax(-1) == first).float().mean()))
    assert np.isfinite(table["median_rank"]).all() and (out / "figures" / "logit_lens.png").exists()
    bad = CliRunner().invoke(app, [*args[:-2], "--roles", "image", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "single-position role" in bad.output
