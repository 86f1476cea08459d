"""Every experiment through the CLI on the dataset the paper used for it, in its distributed layout (miniature)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from narrowgate.analyses.steering import names
from narrowgate.cli import app
from narrowgate.data import class_pairs, tasks
from narrowgate.data.prompts import VQA
from narrowgate.store import RunStore
from tests.analyses.ablation_outcome import check_ablation_outcome
from tests.data import layouts

pytestmark = pytest.mark.slow  # minutes: demo runs, fine-tuning, the paper datasets' layouts

runner = CliRunner()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-data")
    return {
        "imagenet": layouts.imagenet(root / "imagenet", train=2, val=1),
        "vqav2": layouts.vqav2(root / "vqav2"),
        "coco": layouts.coco_karpathy(root / "coco"),
        "flickr30k": layouts.flickr30k(root / "flickr30k"),
    }


def _run(checkpoint_dir, datasets, tmp_path, experiment, data, *args):
    out = tmp_path / f"{experiment}-{data}"
    argv = [
        "run",
        experiment,
        "--model",
        str(checkpoint_dir("chameleon")),
        "--data",
        data,
        "--data-dir",
        str(datasets[data]),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--quiet",
        *args,
    ]
    result = runner.invoke(app, argv, env={"COLUMNS": "200"})
    return result, out


def _ok(result):
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


CASES = [
    ("modality-gap", "flickr30k", ("--n", "20")),
    ("cross-attention", "imagenet", ("--n-per-class", "1", "--n", "12")),
    ("overlap", "imagenet", ("--n-per-class", "2", "--n", "200", "--k", "1")),
    (
        "overlap",
        "imagenet",
        ("--n-per-class", "2", "--n", "200", "--k", "1", "--sweep", "--sweep-step", "2", "--outputs-only"),
    ),
    ("cross-attention", "imagenet", ("--n-per-class", "1", "--n", "12", "--normalise", "after-mean")),
    ("ablation", "vqav2", ("--n", "4", "--max-new-tokens", "3")),
    ("ablation", "coco", ("--n", "4", "--max-new-tokens", "3")),
    ("ablation", "flickr30k", ("--n", "4", "--max-new-tokens", "3", "--cider-tokenize", "raw")),
    ("ablation", "imagenet", ("--n-per-class", "2", "--n", "200", "--k", "1")),
]


@pytest.mark.parametrize(
    ("experiment", "data", "args"), CASES, ids=[f"{e}-{d}-{i}" for i, (e, d, _) in enumerate(CASES)]
)
def test_experiment_runs_on_the_papers_dataset(experiment, data, args, checkpoint_dir, datasets, tmp_path):
    result, out = _run(checkpoint_dir, datasets, tmp_path, experiment, data, *args)
    # The ablation of a random-weight checkpoint may be at chance: then the run refuses (records kept).
    if experiment == "ablation":
        finished = check_ablation_outcome(result, out)
    else:
        _ok(result)
        finished = True
    manifest = _manifest(out)
    n = int(args[args.index("--n") + 1])
    assert manifest["data"]["requested"]["n"] == n and manifest["data"]["actual"]["examples"] == n
    assert len(RunStore(out).failures()) == 0
    tables = RunStore(out).tables()
    if data == "imagenet":  # the paper sampled the train split
        ids = RunStore(out).records().rows["example_id"]
        assert ids.str.match(r"n\d{8}/n\d{8}_\d$").all()
    if (experiment, data) == ("ablation", "vqav2"):
        assert manifest["config"]["vqa_prompt"] == VQA + " Answer:"  # the authors' Chameleon prompt
    if "--sweep" in args:
        # none, and the three knockouts (the authors' two and image->eoi+text) over windows 0-1 and 0-2
        assert tables["overlap"]["knockout"].nunique() == 7 and tables["overlap"]["resid"].min() == 1
        assert set(tables["overlap_sweep"]["sweep"]) == {"eoi->eoi+text", "image->text", "image->eoi+text"}
    if "--normalise" in args:
        assert manifest["config"]["normalise"] == "after-mean"
    if (experiment, data) == ("ablation", "flickr30k") and finished:
        assert tables["ablation"]["metric"].iloc[0] == "cider (raw strings)"


def test_patching_runs_on_imagenet_with_every_pair(checkpoint_dir, datasets, tmp_path):
    result, out = _run(checkpoint_dir, datasets, tmp_path, "patching", "imagenet", "--n-per-class", "2")
    _ok(result)
    tables = RunStore(out).tables()
    pairs = tables["patching_pairs"]
    assert len(pairs) == 10 and (pairs["n"] == 2).all()
    printed = {(a.word, b.word) for a, b in class_pairs()}
    assert {(t, b) for b, t in zip(pairs["base"], pairs["target"])} == printed  # base <- target, first donates
    assert len(tables["patching"]) == 3 and set(tables["patching"]["direction"]) == {"paper"}
    manifest = _manifest(out)
    assert manifest["data"]["requested"] == {"n_per_class": 2}
    assert manifest["data"]["actual"]["classes"] == 20 and manifest["data"]["actual"]["units"] == 20
    assert manifest["config"]["prompt"] == "This animal is a"


def test_too_few_images_stop_with_the_count_unless_allowed(checkpoint_dir, datasets, tmp_path):
    result, _ = _run(checkpoint_dir, datasets, tmp_path, "patching", "imagenet", "--n-per-class", "3")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output
    assert "only 2 exist" in result.output and "--allow-fewer" in result.output
    result, _ = _run(checkpoint_dir, datasets, tmp_path, "modality-gap", "flickr30k", "--n", "30")
    assert result.exit_code == 1 and "only 24 exist" in result.output
    result, out = _run(
        checkpoint_dir, datasets, tmp_path, "ablation", "coco", "--n", "6", "--max-new-tokens", "2", "--allow-fewer"
    )
    check_ablation_outcome(result, out)
    manifest = _manifest(out)
    assert manifest["data"]["requested"] == {"n": 6} and manifest["data"]["actual"]["examples"] == 4


def test_imagenet_val_layout_serves_the_pair_classes(datasets, tmp_path):
    import shutil

    val_only = tmp_path / "val-only"
    shutil.copytree(datasets["imagenet"] / "val", val_only / "val")
    got = tasks.load("imagenet", "classes", val_only, seed=0, n_per_class=1, classes="pairs")
    assert len({e.label for e in got}) == 20 and all("ILSVRC2012_val" in e.id for e in got)


def test_steering_generates_with_the_target_eoi_on_imagenet(checkpoint_dir, datasets, tmp_path):
    result, out = _run(
        checkpoint_dir,
        datasets,
        tmp_path,
        "steering",
        "imagenet",
        "--n-per-class",
        "1",
        "--resids",
        "0-2",
        "--max-new-tokens",
        "3",
    )
    _ok(result)
    tables = RunStore(out).tables()
    assert len(tables["steering_pairs"]) == 10 and len(tables["steering_examples"]) == 10
    summary = tables["steering"].iloc[0]
    assert summary["resids"] == "0-2" and summary["n"] == 10
    rows = RunStore(out).records().rows
    hits = [names(txt, tgt) for tgt, txt in zip(rows["target"], rows["text_steered"])]  # whole words
    assert summary["names_target_steered"] == pytest.approx(sum(hits) / len(hits))
    assert set(zip(rows["target"], rows["base"])) == {(a.word, b.word) for a, b in class_pairs()}


def test_gate_scan_honours_allow_fewer_on_imagenet(checkpoint_dir, datasets, tmp_path):
    args = ("--n-per-class", "3", "--n", "12", "--bootstrap", "50")
    result, out = _run(checkpoint_dir, datasets, tmp_path, "gate-scan", "imagenet", *args)
    assert result.exit_code == 1 and "only 2 exist" in result.output and "--allow-fewer" in result.output
    assert not (out / "manifest.json").exists()
    result, out = _run(checkpoint_dir, datasets, tmp_path, "gate-scan", "imagenet", *args, "--allow-fewer")
    _ok(result)
    manifest = _manifest(out)
    assert manifest["data"]["requested"] == {"n_per_class": 3, "n": 12}
    assert manifest["data"]["actual"]["examples"] == 12 and manifest["data"]["actual"]["max_per_class"] <= 2
    assert RunStore(out).tables()["gate"].iloc[0]["n_exact"] == 12


def test_authors_inputs_on_imagenet_pixtral_size_and_chameleon_34b_prompt(checkpoint_dir, datasets, tmp_path):
    """On the ImageNet layout: Pixtral reads 512 x 512 images and a 48-layer Chameleon the long prompt, as the
    authors' code; both in the manifest."""
    from narrowgate.data.prompts import LONG_CLASS
    from tests.fixtures import chameleon

    argv = ["--data", "imagenet", "--data-dir", str(datasets["imagenet"]), "--n-per-class", "1", "--n", "12"]
    out = tmp_path / "pixtral"
    result = runner.invoke(
        app, ["run", "cross-attention", "--model", str(checkpoint_dir("pixtral")), *argv, "--out", str(out), "--quiet"]
    )
    _ok(result)
    assert _manifest(out)["config"]["image_size"] == "512x512"
    assert set(RunStore(out).records().rows["n_content"]) == {16}  # the tiny processor's 32 x 32 limit, 8-pixel patches
    big = chameleon.build(tmp_path / "chameleon-48", layers=48, hidden=32, heads=2, kv_heads=1)
    for experiment in ("cross-attention", "patching"):
        out = tmp_path / f"c48-{experiment}"
        args = argv if experiment == "cross-attention" else argv[:4] + ["--n-per-class", "1"]
        result = runner.invoke(app, ["run", experiment, "--model", str(big), *args, "--out", str(out), "--quiet"])
        _ok(result)
        manifest = _manifest(out)
        assert manifest["model"]["n_layers"] == 48 and manifest["config"]["prompt"] == LONG_CLASS
        assert manifest["config"]["image_size"] == "processor"


def test_patching_reports_the_authors_flip_rate_on_imagenet(checkpoint_dir, datasets, tmp_path):
    result, out = _run(checkpoint_dir, datasets, tmp_path, "patching", "imagenet", "--n-per-class", "2")
    _ok(result)
    arrays, table = RunStore(out).records().arrays, RunStore(out).tables()
    flips = (arrays["accuracy"] != arrays["accuracy_unpatched"][:, None]).mean(0)
    assert table["patching"]["flip_rate"].tolist() == pytest.approx(flips.tolist())
    assert table["patching_pairs"]["max_flip_rate"].between(0, 1).all()
