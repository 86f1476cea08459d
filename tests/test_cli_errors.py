"""Issue 23, "errors a person can act on": damaged checkpoints, a full disk or read-only file system,
output paths that are files, `compare` of look-alike or damaged runs, a prompt holding the image token,
and `train-organism` over an existing checkpoint: each one line naming the problem and the fix, with
nothing written or damaged (no truncated figure), and the corrected command then works."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from typer.testing import CliRunner

from narrowgate import organisms
from narrowgate.cli import app
from narrowgate.store import RunStore
from tests.analyses.test_refusals import _one_line_refusal
from tests.fixtures import llava as llava_fixture

runner = CliRunner()


def _run(out, *extra, model="native"):
    args = ["run", "ablation", "--model", str(model), "--data", "synthetic", "--task", "vqa", "--n", "2"]
    return runner.invoke(app, [*args, "--max-new-tokens", "2", "--out", str(out), "--quiet", *extra])


# --- checkpoints ------------------------------------------------------------------------------------------
def _rewrite_header(weights: Path, change) -> None:
    data = weights.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = change(json.loads(data[8 : 8 + n]))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _first_tensor(h):
    return next(k for k in h if k != "__metadata__")


CHECKPOINTS = {
    "header nested deeply": (lambda h: b"[" * 200_000 + b"]" * 200_000, "not JSON: nested too deeply"),
    "impossible shape": (
        lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "shape": [10**9, 10**9]}},
        "declares shape [1000000000, 1000000000]",
    ),
    "negative offsets": (
        lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "data_offsets": [-4, 0]}},
        "has impossible data_offsets [-4, 0]",
    ),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_a_damaged_safetensors_header_is_one_line(case, tmp_path):
    model = tmp_path / "model"
    llava_fixture.build(model)
    change, message = CHECKPOINTS[case]
    _rewrite_header(model / "model.safetensors", change)
    result = _run(tmp_path / "run", model=model)
    _one_line_refusal(result, message)
    assert "model.safetensors" in result.output and not (tmp_path / "run" / "manifest.json").exists()


def test_a_pickle_checkpoint_torch_refuses_is_one_line_and_never_run(tmp_path):
    model = tmp_path / "model"
    llava_fixture.build(model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Planted:  # unpickled without torch's weights_only guard, it would create ``marker``
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w')",)

    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Planted()}, protocol=2))
    result = _run(tmp_path / "run", model=model)
    _one_line_refusal(result, "pytorch_model.bin) are a pickle that torch refuses to load safely")
    assert "safetensors" in result.output and not marker.exists()
    assert not (tmp_path / "run" / "manifest.json").exists()


# --- the machine: a full disk, a read-only file system ----------------------------------------------------
def test_a_full_disk_leaves_no_truncated_figure_and_the_rerun_finishes(tmp_path, monkeypatch):
    real = Figure.savefig

    def full_disk(self, fname, *args, **kwargs):
        if kwargs.get("format") == "pdf":
            Path(fname).write_bytes(b"%PDF-1.4 half a fig")  # what a full disk leaves of the file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", full_disk)
    out = tmp_path / "run"
    result = _run(out)
    _one_line_refusal(result, f"cannot write {out / 'figures' / 'ablation.pdf'}: No space left on device")
    assert "a rerun resumes" in result.output
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["ablation.png"]  # no pdf, no temporary file
    assert len(RunStore(out).records().rows) == 2
    monkeypatch.setattr(Figure, "savefig", real)  # space freed
    assert _run(out).exit_code == 0
    assert (out / "figures" / "ablation.pdf").read_bytes().startswith(b"%PDF") and (out / "report.html").is_file()


def test_a_read_only_file_system_is_one_line(tmp_path, monkeypatch):
    real = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    result = _run(tmp_path / "ro" / "run")
    _one_line_refusal(result, "Read-only file system (the file system is read-only: give --out on a writable one)")


# --- output paths that are files -------------------------------------------------------------------------
def test_out_that_is_a_file_is_refused_and_left_alone(tmp_path):
    victim = tmp_path / "passwd"
    victim.write_text("root:x:0:0")
    _one_line_refusal(_run(victim), f"--out {victim} is a file, not a run directory")
    _one_line_refusal(runner.invoke(app, ["train-organism", "native", "--out", str(victim)]), "is a file, not a folder")
    run = tmp_path / "r"
    assert _run(run).exit_code == 0
    _one_line_refusal(runner.invoke(app, ["compare", str(run), "--out", str(victim)]), "is a file, not a folder")
    assert victim.read_text() == "root:x:0:0"


def test_train_organism_does_not_overwrite_a_checkpoint_without_force(tmp_path):
    target = tmp_path / "organism"
    shutil.copytree(organisms.path("native"), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    result = runner.invoke(app, ["train-organism", "native", "--out", str(target)])
    _one_line_refusal(result, f"--out {target} already holds a checkpoint")
    assert "--force" in result.output
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(Exception, match="already holds files"):
        organisms.train("native", tmp_path / "notes", tiny=True, progress=False, heldout={})
    card = organisms.train("native", target, tiny=True, progress=False, heldout={}, overwrite=True)
    assert card["kind"] == "native" and (target / "model.safetensors").read_bytes() != before["model.safetensors"]


# --- compare ---------------------------------------------------------------------------------------------
def test_compare_tells_runs_with_the_same_folder_name_apart_and_names_a_damaged_one(tmp_path):
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert _run(a).exit_code == 0 and _run(b).exit_code == 0
    result = runner.invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp" / "compare-ablation.pdf").is_file()
    _one_line_refusal(runner.invoke(app, ["compare", str(a), str(a)]), "The same run directory is given twice")
    manifest = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "model"}))
    result = runner.invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "cmp2")])
    _one_line_refusal(result, "manifest.json names no model family or experiment")
    assert not (tmp_path / "cmp2").exists()


def test_compare_labels_are_the_shortest_distinguishing_paths(tmp_path):
    from narrowgate.cli import _labels

    assert _labels([Path("x/a/run"), Path("x/b/run")]) == ["a/run", "b/run"]
    assert _labels([Path("one"), Path("two")]) == ["one", "two"]


# --- prompts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, token", [("native", "<image>"), ("non-native", "<image>")])
def test_a_prompt_holding_the_image_token_is_one_line(model, token):
    result = runner.invoke(app, ["roles", model, "--prompt", f"{token} hi"])
    _one_line_refusal(result, f"holds '{token}', an image token of this")
    assert "Remove it from the prompt" in result.output
    assert runner.invoke(app, ["roles", model, "--prompt", "hi there"]).exit_code == 0
