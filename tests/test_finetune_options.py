"""Issue 23 item 2: every fine-tuning number and source is checked, on the command line and in the Python API,
before anything loads or is written; a bad one is one line naming the option and the fix."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from narrowgate.cli import app
from narrowgate.errors import OptionError
from narrowgate.finetune import finetune
from narrowgate.recipes import RECIPES, check, parse_samples

runner = CliRunner()
BASE = ["finetune", "--recipe", "remove-gate", "--data", "synthetic", "--samples", "synthetic=24"]


def _one_line_refusal(result, *needles) -> None:
    assert result.exit_code not in (0, None), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# The cases, each with the option its message must name. The model does not exist: a check that ran
# only after loading would fail on the model instead.
CLI_CASES = {
    "steps 0 (was: a full epoch)": (["--steps", "0"], "--steps"),
    "steps -3 (was: an untrained adapter)": (["--steps", "-3"], "--steps"),
    "lr 0 (was: the recipe's)": (["--lr", "0"], "--lr"),
    "lr inf (was: an all-NaN adapter)": (["--lr", "inf"], "--lr"),
    "lr nan": (["--lr", "nan"], "--lr"),
    "lr negative": (["--lr", "-1e-3"], "--lr"),
    "batch-size 0 (was: the recipe's)": (["--batch-size", "0"], "--batch-size"),
    "micro-batch 0": (["--micro-batch", "0"], "--micro-batch"),
    "heldout -5 (was: trained on 5, held out 35)": (["--heldout", "-5"], "--heldout"),
    "heldout 0": (["--heldout", "0"], "--heldout"),
    "save-every 0 (was: a crash after a step)": (["--save-every", "0"], "--save-every"),
    "seed -1": (["--seed", "-1"], "--seed"),
    "samples typo (was: ignored)": (["--samples", "vqa=10"], "'vqa' is not a source"),
    "samples without N": (["--samples", "synthetic="], "write SOURCE=N"),
    "samples not a number": (["--samples", "synthetic=many"], "whole number"),
    "samples of a source without data": (["--samples", "coco=10"], "--data coco"),
    "device map not JSON": (["--device-map", "{bad"], "--device-map"),
    "unknown recipe": (["--recipe", "nope"], "--recipe 'nope'"),
    "unknown data source": (["--data", "mnist=/tmp"], "'mnist' is not a source"),
    "source without a path": (["--data", "vqav2"], "--data vqav2=DIR"),
    "dtype": (["--dtype", "float8"], "--dtype"),
    "vqa prompt without {question}": (["--vqa-prompt", "Answer:"], "{question}"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_each_bad_setting_before_anything_is_written(case, tmp_path):
    extra, needle = CLI_CASES[case]
    out = tmp_path / "out"
    result = runner.invoke(app, [*BASE, "--model", str(tmp_path / "no-model"), "--out", str(out), *extra])
    _one_line_refusal(result, needle)
    assert not out.exists()


API_CASES = {
    "steps": (dict(steps=0), "--steps"),
    "steps negative": (dict(steps=-3), "--steps"),
    "steps float": (dict(steps=2.5), "--steps"),
    "lr zero": (dict(lr=0.0), "--lr"),
    "lr inf": (dict(lr=float("inf")), "--lr"),
    "lr nan": (dict(lr=float("nan")), "--lr"),
    "lr string": (dict(lr="1e-3"), "--lr"),
    "batch size": (dict(batch_size=0), "--batch-size"),
    "micro batch": (dict(micro_batch=0), "--micro-batch"),
    "heldout": (dict(heldout=-5), "--heldout"),
    "save every": (dict(save_every=0), "--save-every"),
    "seed": (dict(seed=-1), "--seed"),
    "bool count": (dict(steps=True), "--steps"),
    "samples typo": (dict(samples={"vqa": 10}), "'vqa' is not a source"),
    "samples negative": (dict(samples={"synthetic": -1}), "--samples synthetic"),
    "knockout": (dict(knockouts=["eoi"]), "--knockout"),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_python_api_refuses_the_same_settings_before_loading(case, tmp_path):
    kwargs, needle = API_CASES[case]
    settings = {"samples": {"synthetic": 24}, **kwargs}
    with pytest.raises(OptionError) as e:
        finetune(str(tmp_path / "no-model"), "remove-gate", {"synthetic": None}, tmp_path / "out", **settings)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_steps_beyond_the_recipes_epochs_are_refused_not_cut(tmp_path):
    """24 training examples (4 held out beyond them), batch 4: one epoch is 6 steps; --steps 7 would have run 6."""
    with pytest.raises(OptionError, match=r"--steps 7 is more than the recipe's 1 epoch\(s\) of 6 steps"):
        finetune(
            str(tmp_path / "no-model"),
            "remove-gate",
            {"synthetic": None},
            tmp_path / "out",
            samples={"synthetic": 24},
            heldout=4,
            batch_size=4,
            steps=7,
        )
    assert not (tmp_path / "out").exists()


def test_good_settings_give_the_recipe_with_the_overrides():
    rec, sizes = check("remove-gate", {"synthetic": None}, samples={"synthetic": 24}, lr=1e-3, batch_size=8)
    assert (rec.lr, rec.batch_size, rec.rank, rec.knockouts) == (1e-3, 8, 128, ("eoi->text",))
    assert sizes == {"synthetic": 24}
    rec, sizes = check("understanding", {"vqav2": "v", "coco": "c", "llava-instruct": "l"})
    assert sizes == RECIPES["understanding"].mixture and rec == RECIPES["understanding"]
    assert parse_samples(["vqav2=3", " coco = 0 "]) == {"vqav2": 3, "coco": 0}
