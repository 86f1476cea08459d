"""Property tests: random values for every option of ``narrowgate finetune`` and of `narrowgate.recipes.check`.

Each value is either accepted with its documented meaning (the number reaches the fine-tuning unchanged) or
refused with one line naming the option; never a traceback, never a silent substitute (``--lr 0`` once meant
"the recipe's", ``--steps 0`` "a full epoch").
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import narrowgate.finetune as ft
from narrowgate.cli import app
from narrowgate.errors import OptionError
from narrowgate.recipes import RECIPES, SOURCES, check, parse_samples

runner = CliRunner()
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BASE = ["finetune", "--model", "native", "--recipe", "remove-gate", "--data", "synthetic", "--out", "unused"]
COUNTS = {"--steps": "steps", "--batch-size": "batch_size", "--micro-batch": "micro_batch", "--heldout": "heldout"}
COUNTS["--save-every"] = "save_every"


@pytest.fixture
def captured(monkeypatch):
    """Replace the fine-tuning: record what `narrowgate finetune` would run with."""
    seen: list[dict] = []

    def fake(model, recipe, data, out, **kw):
        seen.append({"model": model, "recipe": recipe, "data": data, **kw})
        return {"failures": {"examples": 0}}

    monkeypatch.setattr(ft, "finetune", fake)
    monkeypatch.setattr(ft, "render_card", lambda card: "card")
    return seen


def _refused(result, option: str) -> bool:
    if result.exit_code == 0:
        return False
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit | None)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert option in lines[0] or option.lstrip("-") in lines[0], lines[0]
    return True


def _number_text():
    return st.one_of(
        st.integers(-(10**6), 10**6).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.text(max_size=8),
    )


@PROPERTY
@given(option=st.sampled_from(sorted(COUNTS)), value=_number_text())
def test_property_count_options(option, value, captured):
    captured.clear()
    result = runner.invoke(app, [*BASE, "--samples", "synthetic=64", f"{option}={value}"])
    try:
        number = int(value.strip())
    except ValueError:
        number = None
    if _refused(result, option):
        assert captured == [] and (number is None or number < 1)
    else:  # a whole number, possibly written as one ("1.0"), of at least 1, unchanged
        got = captured[-1][COUNTS[option]]
        assert isinstance(got, int) and got >= 1 and float(value) == got


@PROPERTY
@given(value=_number_text())
def test_property_learning_rate(value, captured):
    captured.clear()
    result = runner.invoke(app, [*BASE, "--samples", "synthetic=64", f"--lr={value}"])
    try:
        number = float(value.strip())
    except ValueError:
        number = None
    if _refused(result, "--lr"):
        assert captured == [] and (number is None or not math.isfinite(number) or number <= 0)
    else:
        assert number is not None and math.isfinite(number) and number > 0 and captured[-1]["lr"] == number


@PROPERTY
@given(items=st.lists(st.text(max_size=16), min_size=1, max_size=3))
def test_property_samples(items, captured):
    captured.clear()
    result = runner.invoke(app, [*BASE, *[a for item in items for a in ("--samples", item)]])
    if _refused(result, "--samples"):
        assert captured == []
        return
    parsed = parse_samples(items)
    assert captured[-1]["samples"] == parsed and set(parsed) <= set(SOURCES)
    assert parsed.get("synthetic", 0) >= 1 and all(n == 0 for s, n in parsed.items() if s != "synthetic")


@PROPERTY
@given(
    recipe=st.sampled_from([*RECIPES, "nope"]),
    data=st.dictionaries(st.sampled_from([*SOURCES, "mnist"]), st.one_of(st.none(), st.text(max_size=5)), max_size=3),
    samples=st.dictionaries(st.sampled_from([*SOURCES, "vqa"]), st.integers(-3, 10**6), max_size=3),
    steps=st.one_of(st.none(), st.integers(-3, 5), st.floats(allow_nan=True, allow_infinity=True)),
    lr=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3)),
    batch=st.one_of(st.none(), st.integers(-3, 300)),
    heldout=st.integers(-3, 100),
    seed=st.integers(-3, 10),
)
def test_property_api_check_accepts_with_meaning_or_refuses_by_name(
    recipe, data, samples, steps, lr, batch, heldout, seed
):
    try:
        rec, sizes = check(
            recipe, data, samples=samples, steps=steps, batch_size=batch, lr=lr, heldout=heldout, seed=seed
        )
    except OptionError as e:
        assert "\n" not in str(e) and str(e).strip()
        return
    assert recipe in RECIPES and set(sizes) == set(data) and all(n >= 1 for n in sizes.values())
    assert rec.lr == (lr or RECIPES[recipe].lr) and math.isfinite(rec.lr) and rec.lr > 0
    assert rec.batch_size == (batch or RECIPES[recipe].batch_size) >= 1
    assert heldout >= 1 and seed >= 0 and (steps is None or (isinstance(steps, int) and steps >= 1))
    for source, n in sizes.items():
        assert n == (samples.get(source) or RECIPES[recipe].mixture[source])
    if set(data) != {"synthetic"}:  # every source of the recipe is given, or left out on purpose
        assert all(s in data or samples.get(s) == 0 for s in RECIPES[recipe].mixture)
