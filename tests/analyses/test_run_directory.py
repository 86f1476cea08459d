"""Issue 23, items 9, 10 and 12: a resume never mixes data, a failed command never poisons its --out,
and a damaged shard is redone (or named, on one line) instead of crashing every rerun."""

from __future__ import annotations

import json
import logging
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from narrowgate.analyses import EXPERIMENTS
from narrowgate.cli import app
from narrowgate.errors import BaselineAtChance
from narrowgate.runner import run
from narrowgate.store import ManifestMismatch, RunStore
from tests.analyses.test_refusals import _one_line_refusal
from tests.data import layouts
from tests.data.helpers import CORRUPT_BYTES, write_jpeg

runner = CliRunner()


def _flickr(tmp_path, n_images=4):
    return layouts.flickr30k(tmp_path / "flickr", n_images=n_images)


def _captions(root, out, **extra):
    """The native organism captions Flickr30k at chance (it never saw it): the run stops after its records are
    written (BaselineAtChance), which is all these tests read."""
    cfg = dict(model="native", data="flickr30k", data_dir=str(root), n=4, max_new_tokens=2, out=str(out))
    try:
        return run(EXPERIMENTS["ablation"](), {**cfg, "progress": False, **extra})
    except BaselineAtChance:
        return RunStore(out)


# --- item 9: resume on changed data, a lost manifest, an edited manifest ----------------------------------
def test_resume_on_changed_data_is_refused(tmp_path):
    root, out = _flickr(tmp_path), tmp_path / "run"
    _captions(root, out)
    recorded = RunStore(out).records().rows
    assert recorded["data_sha256"].str.len().eq(64).all()
    _captions(root, out)  # the same data: resumes
    token = root / "results_20130124.token"
    original = token.read_text()
    token.write_text(original.replace("#0\ta dog", "#0\ta wolf", 1))  # one caption of one image edited
    with pytest.raises(ManifestMismatch, match=r"1 recorded example\(s\) changed \(e\.g\. 1000000"):
        _captions(root, out)
    token.write_text(original)
    write_jpeg(root / "flickr30k-images" / "1000002.jpg", size=(16, 16))  # an image replaced by another
    with pytest.raises(ManifestMismatch, match=r"changed \(e\.g\. 1000002: its annotations or image file\)"):
        _captions(root, out)
    shutil.rmtree(root)
    root = _flickr(tmp_path, n_images=9)  # the copy grew: the seeded sample of 4 moves
    with pytest.raises(ManifestMismatch, match=r"no longer in the sample"):
        _captions(root, out)
    assert len(RunStore(out).records().rows) == 4  # nothing was written by the refused attempts


def test_fixing_a_failed_example_still_resumes(tmp_path):
    root, out = _flickr(tmp_path), tmp_path / "run"
    (root / "flickr30k-images" / "1000001.jpg").write_bytes(CORRUPT_BYTES)
    _captions(root, out)
    assert list(RunStore(out).failures()["example_id"]) == ["1000001"]
    write_jpeg(root / "flickr30k-images" / "1000001.jpg", size=(8, 8))  # fixed: a failure carries no data
    store = _captions(root, out, retry_failed=True)
    assert len(store.failures()) == 0 and len(store.records().rows) == 4


def test_records_without_a_manifest_or_with_an_edited_one_are_refused(tmp_path):
    root, out = _flickr(tmp_path), tmp_path / "run"
    _captions(root, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()
    with pytest.raises(ManifestMismatch, match="holds records but no manifest.json"):
        _captions(root, out)
    assert not (out / "manifest.json").exists()
    for key in ("config", "fingerprint"):
        (out / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != key}))
        with pytest.raises(ManifestMismatch, match=f"has no '{key}' \\(it was edited, or written by an older"):
            _captions(root, out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert len(_captions(root, out).records().rows) == 4


# --- item 10: a command that fails after the manifest does not poison --out --------------------------------
def test_a_run_that_produced_no_record_is_replaced_by_the_corrected_command(tmp_path, caplog):
    out = tmp_path / "run"
    args = ["run", "ablation", "--model", "native", "--data", "synthetic", "--task", "vqa", "--n", "2"]
    args += ["--max-new-tokens", "2", "--out", str(out), "--quiet"]
    failed = runner.invoke(app, [*args, "--knockout", "image[99999]"])
    _one_line_refusal(failed, "No example of")
    assert "image[99999]" in failed.output and (out / "manifest.json").exists()
    with caplog.at_level(logging.WARNING, logger="narrowgate.run"):
        good = runner.invoke(app, args)
    assert good.exit_code == 0, good.output
    assert "replacing a run that produced no record (2 failure record(s))" in caplog.text
    store = RunStore(out)
    assert len(store.records().rows) == 2 and len(store.failures()) == 0
    assert "knockout" not in json.loads((out / "manifest.json").read_text())["config"]
    assert "image[99999]->text" not in set(store.tables()["ablation"]["condition"])
    # a run with records is never replaced: a different command is refused as before
    _one_line_refusal(runner.invoke(app, [*args, "--knockout", "image[99999]"]), "already holds a run")


def test_settings_only_the_model_can_refuse_are_refused_before_the_manifest(tmp_path):
    lens = ["run", "logit-lens", "--model", "native", "--data", "synthetic", "--n-per-class", "2", "--quiet"]
    result = runner.invoke(app, [*lens, "--roles", "image", "--out", str(tmp_path / "lens")])
    _one_line_refusal(result, "--roles image: the logit lens reads one position per example")
    assert not (tmp_path / "lens").exists()
    steer = ["run", "steering", "--model", "native", "--data", "synthetic", "--n-per-class", "2", "--quiet"]
    result = runner.invoke(app, [*steer, "--resids", "0-40", "--out", str(tmp_path / "steer")])
    _one_line_refusal(result, "--resids 0-40")
    assert "out of range 0..4" in result.output and not (tmp_path / "steer" / "manifest.json").exists()


# --- item 12: damaged shards are redone, a foreign one is named --------------------------------------------
def _classes(out, **extra):
    cfg = dict(model="native", data="synthetic", task="classes", n_per_class=3, k=2, out=str(out), progress=False)
    return run(EXPERIMENTS["ablation"](), {**cfg, **extra})


def test_a_truncated_shard_or_a_missing_arrays_file_is_redone(tmp_path, caplog):
    fresh = _classes(tmp_path / "fresh").tables()["ablation"]
    out = tmp_path / "run"
    _classes(out)
    parts = sorted((out / "records").glob("*.parquet"))
    parts[3].write_bytes(parts[3].read_bytes()[:100])  # truncated
    parts[7].with_suffix(".safetensors").unlink()  # arrays file lost
    parts[9].with_suffix(".safetensors").write_bytes(b"\x10\x00")  # arrays file truncated
    with caplog.at_level(logging.WARNING, logger="narrowgate.run"):
        store = _classes(out)
    assert caplog.text.count("is damaged") == 3 and "moved to" in caplog.text
    assert sorted(p.name for p in (out / "damaged" / "records").iterdir()) == sorted(
        [parts[3].name, parts[7].name, parts[9].name, parts[9].with_suffix(".safetensors").name]
        + [parts[3].with_suffix(".safetensors").name]
    )
    assert len(store.records().rows) == 18 and store.records().rows["example_id"].is_unique
    pd.testing.assert_frame_equal(store.tables()["ablation"], fresh)


@pytest.mark.slow
def test_a_foreign_shard_is_named_and_nothing_is_touched(tmp_path):
    _classes(tmp_path / "other", seed=1)
    out = tmp_path / "run"
    _classes(out)
    stranger = sorted((tmp_path / "other" / "records").glob("*.parquet"))[0]
    shutil.copy(stranger, out / "records" / "part-0-999999.parquet")
    before = sorted(p.name for p in (out / "records").iterdir())
    with pytest.raises(ManifestMismatch, match=r"part-0-999999.parquet is from another run .*move it out of"):
        _classes(out)
    pd.DataFrame({"x": [1]}).to_parquet(out / "records" / "part-0-999999.parquet")
    with pytest.raises(ManifestMismatch, match=r"part-0-999999.parquet is not a narrowgate record shard"):
        _classes(out)
    assert sorted(p.name for p in (out / "records").iterdir()) == before
    (out / "records" / "part-0-999999.parquet").unlink()
    assert len(_classes(out).records().rows) == 18
