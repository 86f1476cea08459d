"""Steering (new, not the paper's): whole-word naming with synonyms, the rates, and single-index sweeps that equal
direct generations with the same patch."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from narrowgate import Capture, Patch
from narrowgate.analyses import EXPERIMENTS
from narrowgate.analyses.steering import SteeringConfig, class_names, load_synonyms, names, window
from narrowgate.cli import app
from narrowgate.data import tasks
from narrowgate.errors import DataError
from narrowgate.runner import run


@pytest.mark.parametrize(
    ("text", "candidates", "want"),
    [
        ("This animal is a Great Grey Owl.", ["great grey owl"], True),
        ("a great-grey owl", ["great grey owl"], True),
        ("a great grey", ["great grey owl"], False),
        ("a bowl of soup", ["owl"], False),
        ("owls", ["owl"], False),  # whole words: a plural is a synonym to give
        ("an owl!", ["great grey owl", "owl"], True),
        ("a husky dog", "Siberian husky", False),
        ("a husky dog", ["Siberian husky", "husky"], True),
        ("a c++ compiler", ["c++"], True),  # names are matched literally, never as patterns
    ],
)
def test_names_matches_whole_words_case_insensitively(text, candidates, want):
    assert names(text, candidates) is want


def test_synonyms_by_name_or_label_and_bad_files_are_refused(tmp_path):
    path = tmp_path / "syn.json"
    path.write_text(json.dumps({"Great grey owl": ["owl"], "n02110185": ["husky", "sled dog"]}))
    syn = load_synonyms(str(path))
    assert class_names("great grey owl", "n01622779", syn) == ["great grey owl", "owl"]
    assert class_names("Siberian husky", "n02110185", syn) == ["Siberian husky", "husky", "sled dog"]
    assert class_names("cheetah", "n02130308", syn) == ["cheetah"] and load_synonyms(None) == {}
    for content, match in (("[1, 2]", "JSON object"), ('{"owl": "bird"}', "JSON object"), ("{", "not readable")):
        path.write_text(content)
        with pytest.raises(DataError, match=match):
            load_synonyms(str(path))
    with pytest.raises(DataError, match="does not exist"):
        load_synonyms(str(tmp_path / "missing.json"))


def test_default_window_is_relative_depth_a_quarter_to_a_half():
    assert window(SteeringConfig(), 32) == tuple(range(8, 17)) and window(SteeringConfig(), 48) == tuple(range(12, 25))
    assert window(SteeringConfig(resids="3,5"), 32) == (3, 5)


def test_sweep_patches_each_index_alone_and_equals_direct_generation(checkpoint_dir, loaded, tmp_path):
    vlm = loaded("chameleon")
    syn = tmp_path / "syn.json"
    syn.write_text(json.dumps({"circle": ["round"]}))
    cfg = dict(
        model=str(checkpoint_dir("chameleon")),
        data="synthetic",
        out=str(tmp_path / "run"),
        n_per_class=1,
        sweep=True,
        max_new_tokens=3,
        synonyms=str(syn),
        progress=False,
        batch_size=4,
    )
    store = run(EXPERIMENTS["steering"](), cfg, vlm=vlm, command=["t"])
    tables, records = store.tables(), store.records()
    L = vlm.n_layers
    sweep = tables["steering_sweep"]
    assert list(sweep["resid"]) == list(range(L)) and list(sweep["relative_depth"]) == [l / L for l in range(L)]
    assert (store.path / "figures" / "steering_sweep.png").stat().st_size > 1000
    row = records.rows.iloc[0]
    pairs = {e.id: e for e in tasks.load("synthetic", "classes", None, seed=42, n_per_class=1, classes="pairs")}
    unit_base, unit_target = pairs[row["base_image"]], pairs[row["target_image"]]
    prompt = "This shape is a"
    base = vlm.prepare([unit_base.load_image()], [prompt])
    target = vlm.prepare([unit_target.load_image()], [prompt])
    donor = vlm.forward(target, capture=Capture("eoi")).residuals["eoi"]
    for l in range(L):
        want = vlm.generate(base, patches=[Patch("eoi", l, donor[:, l])], max_new_tokens=3)
        assert row["text_sweep"][l] == vlm.decode(want, base)[0].strip()
    # the names each text was matched against are recorded with it, synonyms included
    circle = records.rows[records.rows["target"] == "circle"].iloc[0]  # pair (circle, square): circle donates
    assert list(circle["target_names"]) == ["circle", "round"] and list(circle["base_names"]) == ["square"]
    hits = [names(t[0], list(n)) for t, n in zip(records.rows["text_sweep"], records.rows["target_names"])]
    assert sweep["names_target"].iloc[0] == pytest.approx(sum(hits) / len(hits))


def test_bad_synonyms_file_is_refused_before_the_model_loads(tmp_path):
    bad = tmp_path / "syn.json"
    bad.write_text("[]")
    out = tmp_path / "run"
    args = ["run", "steering", "--model", str(tmp_path / "no-model"), "--data", "synthetic"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--synonyms", str(bad)])
    assert result.exit_code == 1 and "--synonyms" in result.output and "JSON object" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (out / "manifest.json").exists()
