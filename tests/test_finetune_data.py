"""Issue 27 item 7, fine-tuning data: missing recipe sources refused, shortages an error unless --allow-fewer,
held-out examples drawn beyond the sheet's counts, per-source counts, failures and inferences in the card, the
gate-removal check in mask mode too. On the miniature training layouts of tests/data/train_layouts."""

from __future__ import annotations

import json

import pytest

import narrowgate as ng
from narrowgate.engine.interventions import Knockout
from narrowgate.errors import DataError, OptionError
from narrowgate.finetune import _examples, finetune, heldout_scores, mixture, templates, with_prompts
from narrowgate.recipes import check
from narrowgate.store import RunStore
from tests.data import train_layouts


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    return {
        "vqav2": str(train_layouts.vqav2_train(root / "vqav2", n_images=6, per_image=2)),  # 12 questions
        "coco": str(train_layouts.coco_train(root / "coco", n_images=8)),
        "llava-instruct": str(train_layouts.llava_instruct(root / "llava", n=12, answers={3: "See <image> here."})),
    }


# --- missing recipe sources ----------------------------------------------------------------------------------
def test_a_recipe_source_missing_from_data_is_refused_unless_samples_leaves_it_out(layouts):
    data = {"vqav2": layouts["vqav2"], "llava-instruct": layouts["llava-instruct"]}
    with pytest.raises(OptionError, match=r"trains on coco \(18750\) too.*--data coco=PATH.*--samples coco=0"):
        check("understanding", data)
    _, sizes = check("understanding", data, samples={"coco": 0})
    assert sizes == {"vqav2": 18750, "llava-instruct": 150000}
    with pytest.raises(OptionError, match=r"llava-instruct \(7500\)"):
        check("remove-gate", {"vqav2": layouts["vqav2"]})
    # The synthetic stand-in (no files: tests, the demo) replaces the recipe's sources.
    assert check("remove-gate", {"synthetic": None}, samples={"synthetic": 8})[1] == {"synthetic": 8}


# --- shortages --------------------------------------------------------------------------------------------------
def test_a_shortage_is_an_error_unless_allow_fewer(layouts):
    paths = {"vqav2": layouts["vqav2"]}
    with pytest.raises(DataError, match=r"has 12 usable examples; the run needs 14 \(10 for training, 4 held out"):
        mixture(paths, {"vqav2": 10}, heldout=4, seed=0)
    train, held = mixture(paths, {"vqav2": 10}, heldout=4, seed=0, allow_fewer=True)
    assert (len(train), len(held)) == (10, 2)
    train, held = mixture(paths, {"vqav2": 20}, heldout=4, seed=0, allow_fewer=True)
    assert (len(train), len(held)) == (12, 0)


# --- held-out examples beyond the sheet's counts ---------------------------------------------------------------
def test_heldout_examples_are_drawn_beyond_each_sources_training_sample(layouts):
    sizes = {"vqav2": 6, "coco": 4, "llava-instruct": 6}
    train, held = mixture(layouts, sizes, heldout=4, seed=3)
    by_source = {s: [it.id for it in train if it.source == s] for s in sizes}
    for source, n in sizes.items():
        alone = [it.id for it in _examples(source, layouts[source], n, 3)]  # the sheet's count drawn alone
        assert sorted(by_source[source]) == sorted(alone), source
    assert not {it.id for it in held} & {it.id for it in train}
    # 1.5 / 1 / 1.5 of 4: the remaining one goes to the first name among the tied
    assert {it.source: sum(h.source == it.source for h in held) for it in held} == {
        "vqav2": 1,
        "llava-instruct": 2,
        "coco": 1,
    }
    # the same command draws the same examples, in the same order
    again = mixture(layouts, sizes, heldout=4, seed=3)
    assert [it.id for it in again[0]] == [it.id for it in train] and [it.id for it in again[1]] == [
        it.id for it in held
    ]


def test_synthetic_training_sample_does_not_depend_on_the_heldout_size():
    a, held_a = mixture({"synthetic": None}, {"synthetic": 20}, heldout=4, seed=1)
    b, held_b = mixture({"synthetic": None}, {"synthetic": 20}, heldout=10, seed=1)
    assert [it.id for it in a] == [it.id for it in b] and len(a) == 20
    assert {it.id for it in held_a} < {it.id for it in held_b} and (len(held_a), len(held_b)) == (4, 10)
    assert not {it.id for it in held_b} & {it.id for it in b}


# --- the card -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_card_records_counts_failures_departures_and_inferences(layouts, checkpoint_dir, tmp_path):
    base = checkpoint_dir("chameleon")
    out = tmp_path / "ft"
    samples = {"vqav2": 6, "coco": 4, "llava-instruct": 6}
    card = finetune(
        str(base), "understanding", layouts, out, samples=samples, steps=2, batch_size=4, heldout=4, progress=False
    )
    data = card["data"]
    assert {s: (d["requested"], d["train"], d["heldout"]) for s, d in data.items()} == {
        "vqav2": (6, 6, 1),
        "coco": (4, 4, 1),
        "llava-instruct": (6, 6, 2),
    }
    assert data["vqav2"]["recipe"] == 18750 and data["llava-instruct"]["recipe"] == 150000
    # the llava example whose answer holds the image token (drawn at this seed) is a failure, counted by source
    assert data["llava-instruct"]["failures"] == 1 == card["failures"]["examples"]
    assert RunStore(out).failures()["example_id"].tolist() == ["llava-instruct:000000000003-0"]
    text = " ".join(card["inferences"])
    for needle in (
        "answer tokens only",
        "first question and answer",
        "first caption",
        "multiple_choice_answer",
        "split evenly",
        "beyond each source's training sample",
        "vqa prompt on vqav2 examples",
    ):
        assert needle in text, needle
    assert any("vqav2: 6 examples, the sheet's recipe has 18750" in d for d in card["departures"])
    assert any("stopped after 2 steps" in d for d in card["departures"])
    md = (out / "CARD.md").read_text()
    assert "| vqav2 | 18750 | 6 | 6 | 1 | 0 |" in md and "## Inferences" in md and "## Departures" in md


@pytest.mark.slow
def test_gate_removal_is_checked_in_mask_mode_too(checkpoint_dir, tmp_path):
    base = checkpoint_dir("chameleon")
    settings = dict(samples={"synthetic": 24}, steps=2, batch_size=4, micro_batch=4, heldout=4, seed=5)
    card = finetune(str(base), "remove-gate", {"synthetic": None}, tmp_path / "ft", progress=False, **settings)
    before = card["heldout"]["before"]
    assert list(before) == ["baseline", "eoi->text", "eoi->text:mask"]
    # Independently: the base model's held-out scores with the mask-mode knockout, on the same held-out examples.
    vlm = ng.load(base)
    _, held = mixture({"synthetic": None}, {"synthetic": 24}, heldout=4, seed=5)
    held = with_prompts(held, templates(vlm, {"synthetic": None}, {}))
    assert heldout_scores(vlm, held, [Knockout("eoi", "text", mode="mask")], 4) == before["eoi->text:mask"]
    assert json.loads((tmp_path / "ft" / "card.json").read_text())["heldout"]["after"].keys() == before.keys()
