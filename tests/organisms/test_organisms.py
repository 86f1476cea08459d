"""The shipped model organisms load with narrowgate and answer held-out questions; training lowers the loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import narrowgate
from narrowgate import organisms
from narrowgate.cli import app
from narrowgate.data.base import DEFAULT_SEED
from narrowgate.data.prompts import VQA
from narrowgate.data.synthetic import synthetic_vqa
from narrowgate.errors import OptionError
from narrowgate.metrics import vqa_accuracy
from narrowgate.organisms import card as cardlib
from narrowgate.organisms import common, heldout, native, non_native

#: The shipped organisms.
KINDS = ("native", "non-native", "gated")
#: Held-out accuracy each shipped organism must reach on 12 questions of one kind (chance: 1/6, 1/9, 1/6); the
#: gated organism answers "bottom" for "bottom left" on a third of this sample (its card: 0.96 on 93 questions).
THRESHOLDS = {"color": 0.8, "position": 0.8, "shape": 0.5}
GATED_THRESHOLDS = {**THRESHOLDS, "position": 0.6}


@pytest.fixture(scope="module")
def shipped():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = narrowgate.load(organisms.path(kind), dtype="float32")
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("question", sorted(THRESHOLDS))
def test_shipped_organism_answers_heldout_questions(shipped, kind, question):
    vlm = shipped(kind)
    examples = synthetic_vqa(12, DEFAULT_SEED + 1, kinds=(question,))
    batch = vlm.prepare([e.load_image() for e in examples], [VQA.format(question=e.question) for e in examples])
    preds = vlm.decode(vlm.generate(batch, max_new_tokens=8), batch)
    acc = sum(vqa_accuracy(p.strip(), e.answers) for p, e in zip(preds, examples)) / len(examples)
    assert acc >= (GATED_THRESHOLDS if kind == "gated" else THRESHOLDS)[question], list(
        zip(preds, [e.answers[0] for e in examples])
    )


@pytest.mark.parametrize("kind", KINDS)
def test_card_reports_heldout_scores_above_chance(kind):
    card = json.loads((organisms.path(kind) / "card.json").read_text())
    assert (organisms.path(kind) / "CARD.md").is_file()
    h = card["heldout"]
    assert h["vqa"]["accuracy"] > 3 * h["vqa"]["chance"]
    assert h["captions"]["cider"] > 2 * h["captions"]["chance"]
    assert h["classes"]["accuracy"] > 2 * h["classes"]["chance"]
    assert card["kind"] == kind and card["seed"] == 0


def test_shipped_weights_fit_the_budget():
    total = sum(p.stat().st_size for k in KINDS for p in organisms.path(k).glob("*.safetensors"))
    assert 0 < total <= 25_000_000


def test_native_rows_match_the_processor(shipped):
    """Training rows are the processor's layout for the same prompt, with the VQ codes in place of <image>."""
    vlm = shipped("native")
    processor, family = vlm.processor, vlm.family
    scenes = common.training_scenes(1, seed=0)
    images = common.render(scenes)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        codes = vlm.model.get_image_tokens(pixels)
    seqs = native.Sequences(processor, codes, scenes, generation_share=0.0, seed=0)
    placeholder = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    eos = processor.tokenizer.eos_token_id

    def expected(text, image_first):
        ids = family.encode(images, [family.prompt(text, image_first)])["input_ids"][0]
        ids[ids == placeholder] = codes[0].to(ids.dtype)
        return ids.tolist()

    ex = common.Example("vqa", VQA.format(question="What color is the shape?"), " " + scenes[0].color)
    assert seqs.understanding(0, ex) == expected(ex.prompt, True) + seqs.text(ex.target) + [eos]
    caption = "a red circle in the top left"
    assert seqs.generation(0, caption) == expected(caption, False) + [eos]


def test_non_native_rows_match_the_processor(shipped):
    """Training rows are the processor's chat prompt, then the answer and </s>, the loss on those only."""
    vlm = shipped("non-native")
    rows = non_native.Rows(vlm.processor, common.training_scenes(1, seed=0), seed=0)
    ex = common.Example("class", common.CLASS_PROMPT, " circle")
    ids, labels = rows.pair(ex)
    batch = vlm.prepare(common.render(common.training_scenes(1, seed=0)), [ex.prompt])
    T = batch.length
    assert ids[:T] == batch.input_ids[0].tolist()
    assert labels[:T] == [-100] * T
    assert ids[T:] == labels[T:] == rows.ids(" circle") + [vlm.processor.tokenizer.eos_token_id]


@pytest.mark.parametrize("kind", KINDS)
def test_short_training_lowers_the_loss_and_loads(tmp_path, kind):
    card = organisms.train(kind, tmp_path, tiny=True, progress=False, heldout={})
    main = card["phases"]["instruct" if kind == "non-native" else "lm"]
    assert main["final_loss"] < main["first_loss"]
    assert card["heldout"] is None and (tmp_path / "card.json").is_file()
    vlm = narrowgate.load(tmp_path)
    batch = vlm.prepare(common.render(common.training_scenes(1, 0)), ["This shape is a"])
    assert vlm.generate(batch, max_new_tokens=2).shape[1] > batch.length


@pytest.mark.slow
def test_training_is_reproducible_from_the_seed(tmp_path):
    """Two runs from the same seed give the same weights; another seed gives other weights."""
    weights = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        organisms.train("native", tmp_path / run, seed=seed, tiny=True, progress=False, heldout={})
        weights.append(load_file(tmp_path / run / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_train_organism_command_writes_checkpoint_and_card(tmp_path, monkeypatch):
    """The CLI trains (here the tiny recipe), evaluates on held-out data and prints the card."""
    monkeypatch.setattr(organisms, "_DEFAULTS", dict(organisms._TINY))
    monkeypatch.setattr(heldout, "SIZES", {"vqa": 12, "captions": 6, "classes": 2})
    out = tmp_path / "nn"
    result = CliRunner().invoke(
        app, ["train-organism", "non-native", "--out", str(out), "--seed", "3"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "Held-out scores" in result.output and str(out) in result.output
    card = json.loads((out / "card.json").read_text())
    assert card["seed"] == 3 and card["heldout"]["vqa"]["n"] == 12 and card["heldout"]["classes"]["n"] == 12
    assert set(card["phases"]) == {"clip", "text", "align", "instruct"}
    assert narrowgate.load(out).family.name == "llava"


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="Unknown organism"):
        organisms.path("hybrid")


def test_tolerance_flags_only_scores_outside_it():
    shipped = json.loads((organisms.path("native") / "card.json").read_text())
    moved = json.loads(json.dumps(shipped))
    moved["heldout"]["captions"]["cider"] -= 0.4  # inside the CIDEr-D tolerance of 0.5
    moved["heldout"]["classes"]["accuracy"] += 0.15  # outside 0.1
    out = cardlib.outside_tolerance(shipped, moved)
    assert out == {"classes": (shipped["heldout"]["classes"]["accuracy"], moved["heldout"]["classes"]["accuracy"])}
    assert cardlib.outside_tolerance(shipped, shipped) == {}


@pytest.mark.retrain
def test_full_native_recipe_reproduces_the_shipped_scores(tmp_path):
    """What the README claims: retraining from the seed gives the shipped held-out scores within
    `TOLERANCE` on any machine; bit-identical weights where CPU model, threads and versions match."""
    shipped_dir = organisms.path("native")
    shipped = json.loads((shipped_dir / "card.json").read_text())
    card = organisms.train("native", tmp_path, seed=shipped["seed"], progress=False)
    assert cardlib.outside_tolerance(shipped, card) == {}
    same = {k: shipped["machine"].get(k) for k in ("cpu", "cpu_threads")} == {
        k: card["machine"][k] for k in ("cpu", "cpu_threads")
    } and shipped["versions"] == card["versions"]
    if same:
        ref, got = load_file(shipped_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
        assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_gated_recipe_trains_masked_then_distils_then_unmasked(tmp_path):
    """The gated recipe's phases run in order, each lowers its loss, and the card carries the gate checks."""
    from narrowgate.organisms import gated

    card = organisms.train(
        "gated", tmp_path, tiny=True, progress=False, heldout={}, overrides={"distil_steps": 8, "unmasked_steps": 4}
    )
    phases = card["phases"]
    assert list(phases)[-3:] == ["lm", "distil", "unmasked"]
    assert phases["lm"]["final_loss"] < phases["lm"]["first_loss"]
    assert phases["distil"]["final_loss"] < phases["distil"]["first_loss"]
    checks = card["gate"]["conditions"]
    assert set(checks) == {"baseline", *(k.name for k in gated.CHECKS)}
    assert (
        checks["baseline"]["vqa"]["relative"] == 1.0
        or checks["baseline"]["vqa"]["score"] <= checks["baseline"]["vqa"]["chance"]
    )
    vlm = narrowgate.load(tmp_path)  # a stock checkpoint: nothing of the engine is saved with it
    assert vlm.model.config.get_text_config()._attn_implementation in ("sdpa", "narrowgate_sdpa")
    assert json.loads((tmp_path / "config.json").read_text()).get("_attn_implementation") is None


def test_shipped_gated_organism_reads_the_image_through_eoi(shipped):
    """Measured live on held-out questions, stock checkpoint, both knockout modes: [EOI] -> text knocked out leaves
    VQA at chance (1/6 for colours and shapes, 1/9 for positions); every image token -> text knocked out ([EOI]
    kept) leaves it at baseline."""
    from narrowgate import Knockout

    vlm = shipped("gated")
    examples = synthetic_vqa(60, DEFAULT_SEED + 2)
    batch = vlm.prepare([e.load_image() for e in examples], [VQA.format(question=e.question) for e in examples])

    def accuracy(knockouts=()):
        preds = vlm.decode(vlm.generate(batch, knockouts=knockouts, max_new_tokens=8), batch)
        return sum(vqa_accuracy(p.strip(), e.answers) for p, e in zip(preds, examples)) / len(examples)

    base, chance = accuracy(), 1 / 6
    assert base >= 0.75
    for mode in ("zero", "mask"):
        eoi, image = accuracy([Knockout("eoi", "text", mode=mode)]), accuracy([Knockout("image", "text", mode=mode)])
        assert eoi <= chance + 0.1 and image >= base - 0.05, (mode, base, eoi, image)
    card = json.loads((organisms.path("gated") / "card.json").read_text())
    assert [a["name"] for a in card["attempts"]][0].startswith("1: masked training only")
    assert set(card["gate"]["conditions"]) == {
        "baseline",
        "eoi->text",
        "image->text",
        "eoi->text:mask",
        "image->text:mask",
    }


def test_native_image_length_is_a_config_field(tmp_path):
    """image_tokens=16: a VQ with four downsamplings, 16 codes per image in training rows and in the processor."""
    card = organisms.train("native", tmp_path, tiny=True, progress=False, heldout={}, overrides={"image_tokens": 16})
    assert card["config"]["image_tokens"] == 16 and "4 x 4 codes" in card["recipe"][0]
    vlm = narrowgate.load(tmp_path)
    images = common.render(common.training_scenes(2, 0))
    batch = vlm.prepare(images, ["This shape is a"] * 2)
    assert [len(lay.content) for lay in batch.layouts] == [16, 16]
    pixels = vlm.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert vlm.model.get_image_tokens(pixels).shape == (2, 16)
    assert "8 x 8 codes" in native.RECIPE[0]  # the shipped recipe keeps its 64


@pytest.mark.parametrize("bad", [32, 9, 1])
def test_native_image_length_must_be_a_square_grid_of_downsamplings(bad):
    with pytest.raises(OptionError, match=f"image_tokens {bad}: .* 4, 16, 64, 256 or 1024"):
        native.build(native.TINY.__class__(**{**native.TINY.__dict__, "image_tokens": bad}))
