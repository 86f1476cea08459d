"""Issue 14: no silent wrong results, no lost or mixed examples, errors a person can act on.

Each test reproduces one reported fault and checks the behaviour now: empty layer sets and
unsupported k refused, the run directory locked (a dead holder's lock taken over), the checkpoint
fingerprinted, nothing written by a command that cannot start, per-example errors recorded as
failures and retried with ``--retry-failed``, synthetic data streamed, and load/data errors that
name the file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

import narrowgate as ng
from narrowgate import data
from narrowgate.analyses import EXPERIMENTS
from narrowgate.cli import app
from narrowgate.data import tasks
from narrowgate.errors import DataError, OptionError
from narrowgate.loading import fingerprint
from narrowgate.metrics.overlap import check_k, overlap_k
from narrowgate.runner import run
from narrowgate.store import ManifestMismatch, RunLocked, RunStore
from tests.data.helpers import write_json
from tests.fixtures import llava as llava_fixture

runner = CliRunner()


def _cfg(model, out, **extra):
    return dict(model=str(model), data="synthetic", out=str(out), progress=False, **extra)


# --- item 1: a layer set that names nothing, or something else, is refused -------------------------------
def test_empty_layer_set_is_refused_through_the_api():
    with pytest.raises(ValueError, match="empty layer set"):
        ng.Knockout("eoi", "text", layers=())
    with pytest.raises(ValueError, match="empty layer set"):
        ng.Capture("eoi", resids=[])


def test_layers_out_of_range_are_refused_before_the_manifest(checkpoint_dir, loaded, tmp_path):
    vlm = loaded("chameleon")
    out = tmp_path / "run"
    with pytest.raises(OptionError, match=f"out of range 0..{vlm.n_layers - 1}"):
        run(
            EXPERIMENTS["ablation"](),
            _cfg(checkpoint_dir("chameleon"), out, task="captions", n=2, layers="0-99"),
            vlm=vlm,
        )
    assert not (out / "manifest.json").exists()
    result = runner.invoke(
        app,
        [
            "run",
            "ablation",
            "--model",
            "native",
            "--data",
            "synthetic",
            "--n",
            "4",
            "--layers",
            "5-2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2 and "--layers" in result.output and not (out / "manifest.json").exists()


# --- item 2: k the classes cannot support is refused, or lowered visibly ---------------------------------
def test_k_larger_than_a_class_is_refused_before_the_model_loads(tmp_path):
    # The reported case: 24 examples of 6 classes, k = 30. The model path does not exist: the refusal
    # comes first, so nothing loads and nothing is written.
    for name in ("ablation", "overlap"):
        cfg = dict(
            model=str(tmp_path / "no-model"),
            data="synthetic",
            n=24,
            n_per_class=4,
            out=str(tmp_path / name),
            **({"task": "classes"} if name == "ablation" else {}),
        )
        with pytest.raises(OptionError, match="--k 30 needs at least 31 examples per class"):
            run(EXPERIMENTS[name](), cfg)
        assert not (tmp_path / name).exists()
    check_k(["a", "a", "b", "b"], 1)
    with pytest.raises(OptionError, match="class 'b' has 2"):
        check_k(["a", "a", "a", "b", "b"], 2)


def test_k_is_lowered_visibly_when_failures_shrink_a_class(caplog):
    with caplog.at_level(logging.WARNING, logger="narrowgate.run"):
        assert overlap_k(["a"] * 5 + ["b"] * 5, 3) == 3
        assert overlap_k(["a"] * 5 + ["b"] * 3, 3) == 2
    assert "uses k=2, not 3" in caplog.text
    with pytest.raises(DataError, match="needs 2 per class"):
        overlap_k(["a", "a", "b"], 1)


def test_ablation_classes_table_states_its_k(tmp_path):
    store = run(  # the shipped organism: above chance (a random checkpoint's ablation is refused)
        EXPERIMENTS["ablation"](),
        _cfg("native", tmp_path / "run", task="classes", n_per_class=3, k=2, batch_size=6),
    )
    assert set(store.tables()["ablation"]["k"]) == {2}


# --- item 3: counts at the API (the CLI is tested in tests/test_cli_options.py) ----------------------------
def test_zero_or_negative_n_is_refused_by_the_data_layer():
    for n in (0, -3):
        with pytest.raises(OptionError, match="--n must be"):
            tasks.load("synthetic", "vqa", None, n=n, seed=0)


# --- item 4: one writer per run directory ---------------------------------------------------------------
def test_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from narrowgate.store import RunStore; "
            f"RunStore({str(out)!r}).lock('first run'); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = [
            "run",
            "ablation",
            "--model",
            "native",  # the shipped organism answers above chance (a random checkpoint's ablation is refused)
            "--data",
            "synthetic",
            "--task",
            "vqa",
            "--n",
            "2",
            "--max-new-tokens",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert f"pid {holder.pid}" in result.output and "first run" in result.output
        assert not list((out / "records").glob("*.parquet")) and not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock is taken over (with a warning) and the run completes.
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(RunStore(out).records().rows) == 2


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path, caplog):
    store = RunStore(tmp_path / "run")
    store.lock_path.write_text(json.dumps({"pid": 999999999, "host": "elsewhere", "since": "then", "command": "old"}))
    with caplog.at_level(logging.WARNING, logger="narrowgate.run"):
        store.lock("new")
    assert "taking over the lock" in caplog.text and "pid 999999999" in caplog.text
    with pytest.raises(RunLocked, match=r"in use by another run \(pid \d+ .*: new\)"):
        RunStore(tmp_path / "run").lock("third")
    store.unlock()
    assert store.lock_path.read_text() == ""
    RunStore(tmp_path / "run").lock("fourth")  # a clean release leaves nothing to take over


# --- item 5: a replaced checkpoint is refused on resume ---------------------------------------------------
def test_resume_on_a_replaced_checkpoint_is_refused(tmp_path):
    model = tmp_path / "model"
    llava_fixture.build(model, seed=0)
    before = fingerprint(model)
    cfg = _cfg(model, tmp_path / "run", n_per_class=2, k=1)  # overlap: no chance level a random model must beat
    run(EXPERIMENTS["overlap"](), cfg)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["fingerprint"] == before and "model.safetensors" in before["files"]
    run(EXPERIMENTS["overlap"](), cfg)  # same checkpoint: resumes
    shutil.rmtree(model)
    llava_fixture.build(model, seed=1)  # same architecture, same file sizes and headers, other weights
    after = fingerprint(model)
    assert after["files"]["model.safetensors"]["size"] == before["files"]["model.safetensors"]["size"]
    assert after["files"]["model.safetensors"]["header_sha256"] == before["files"]["model.safetensors"]["header_sha256"]
    with pytest.raises(ManifestMismatch, match="different fingerprint"):
        run(EXPERIMENTS["overlap"](), cfg)
    assert fingerprint("org/model", "abc123") == {"hub": "org/model", "revision": "abc123"}


# --- item 6: a command that cannot start leaves --out usable ---------------------------------------------
def test_failed_commands_do_not_poison_the_run_directory(tmp_path):
    out = tmp_path / "run"
    model = "native"  # answers above chance: the corrected command's ablation has relative scores
    base = [
        "run",
        "ablation",
        "--data-dir",
        str(tmp_path),
        "--n",
        "4",
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
        "--quiet",
        "--task",
        "captions",
    ]
    bad_data = runner.invoke(app, [*base, "--model", model, "--data", "flickr30k"])  # no caption file there
    assert bad_data.exit_code == 1 and "Flickr30k caption file" in bad_data.output
    bad_model = runner.invoke(app, [*base, "--model", str(tmp_path / "nope"), "--data", "synthetic"])
    assert bad_model.exit_code == 1 and "does not exist" in bad_model.output
    assert not (out / "manifest.json").exists()
    good = runner.invoke(app, [*base, "--model", model, "--data", "synthetic"])
    assert good.exit_code == 0, good.output


# --- item 7: one example's error costs that example; --retry-failed retries it ---------------------------
def test_example_errors_become_failures_and_are_retried(tmp_path, monkeypatch):
    vlm = ng.load("native")  # answers above chance (a random checkpoint's ablation is refused)
    good = data.synthetic_vqa(4, 0)
    poisoned = list(good)
    poisoned[2] = dataclasses.replace(good[2], question="What is <image> showing?")
    monkeypatch.setattr(tasks, "load", lambda *a, **k: poisoned)
    cfg = _cfg("native", tmp_path / "run", task="vqa", n=4, max_new_tokens=2, batch_size=4)
    store = run(EXPERIMENTS["ablation"](), cfg, vlm=vlm)
    failures = store.failures()
    assert list(failures["example_id"]) == [good[2].id] and "Error" in failures["reason"][0]
    assert sorted(store.records().rows["example_id"]) == sorted(e.id for e in good if e.id != good[2].id)
    assert set(store.tables()["ablation"]["n"]) == {3}
    run(EXPERIMENTS["ablation"](), cfg, vlm=vlm)  # a plain rerun does not retry: still failed
    assert list(store.failures()["example_id"]) == [good[2].id]
    monkeypatch.setattr(tasks, "load", lambda *a, **k: good)  # the example is fixed
    store = run(EXPERIMENTS["ablation"](), {**cfg, "retry_failed": True}, vlm=vlm)
    assert len(store.failures()) == 0 and len(store.tables()["failures"]) == 0
    assert sorted(store.records().rows["example_id"]) == sorted(e.id for e in good)
    assert set(store.tables()["ablation"]["n"]) == {4}


def test_a_run_where_no_example_works_is_an_error_not_an_empty_table(checkpoint_dir, loaded, tmp_path, monkeypatch):
    bad = [dataclasses.replace(e, question="<image> <image>") for e in data.synthetic_vqa(2, 0)]
    monkeypatch.setattr(tasks, "load", lambda *a, **k: bad)
    cfg = _cfg(checkpoint_dir("llava"), tmp_path / "run", task="vqa", n=2, max_new_tokens=2)
    with pytest.raises(DataError, match="No example .* could be processed: 2 failure"):
        run(EXPERIMENTS["ablation"](), cfg, vlm=loaded("llava"))


# --- item 8: synthetic data is streamed -------------------------------------------------------------------
def test_synthetic_examples_stream():
    start = time.perf_counter()
    huge = tasks.load("synthetic", "vqa", None, n=10**12, seed=3)
    assert time.perf_counter() - start < 1 and not isinstance(huge, list) and len(huge) == 10**12
    first = list(itertools.islice(huge, 5))
    assert [e.id for e in first] == [e.id for e in data.synthetic_vqa(5, 3)]
    assert [e.question for e in first] == [e.question for e in data.synthetic_vqa(5, 3)]
    assert [e.id for e in itertools.islice(huge, 5)] == [e.id for e in first]  # re-iterable, same order
    captions = tasks.load("synthetic", "captions", None, n=10**12, seed=3)
    assert [e.references for e in itertools.islice(captions, 3)] == [
        e.references for e in data.synthetic_captions(3, 3)
    ]


# --- item 9: load and data errors name the file -----------------------------------------------------------
def test_truncated_weights_and_unknown_model_type_name_the_file(tmp_path):
    model = tmp_path / "model"
    llava_fixture.build(model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ng.LoadError, match="model.safetensors is truncated"):
        ng.load(model)
    weights.unlink()
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    with pytest.raises(ng.LoadError, match="config.json") as err:
        ng.load(model)
    assert "offline" not in str(err.value)


def test_malformed_json_names_the_file(tmp_path):
    root = tmp_path / "flickr"
    (root / "flickr30k-images").mkdir(parents=True)
    (root / "dataset_flickr30k.json").write_text('{"images": [')
    with pytest.raises(DataError, match="dataset_flickr30k.json is not valid JSON"):
        tasks.load("flickr30k", "captions", root, n=2, seed=0)
    write_json(root / "dataset_flickr30k.json", {"pictures": []})
    with pytest.raises(DataError, match="expected an object with a list 'images'"):
        tasks.load("flickr30k", "captions", root, n=2, seed=0)
