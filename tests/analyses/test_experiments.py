"""Every experiment end to end on a tiny checkpoint and synthetic data: files, tables, figures, report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from narrowgate.analyses import EXPERIMENTS
from narrowgate.runner import run
from narrowgate.store import ManifestMismatch

CASES = {
    "modality-gap": dict(n=10),
    "cross-attention": dict(n_per_class=2),
    "overlap": dict(n_per_class=3, k=2),
    "ablation-vqa": dict(task="vqa", n=4, max_new_tokens=4),
    "ablation-captions": dict(task="captions", n=4, max_new_tokens=6),
    "ablation-classes": dict(task="classes", n_per_class=3, k=2),
    "ablation-sweep": dict(task="classes", n_per_class=2, k=1, sweep=True, mode="mask"),
    "patching": dict(n_per_class=2),
    "gate-scan": dict(n_per_class=2, bootstrap=50, floor=1e-4),
    "gate-scan-attribution": dict(n_per_class=2, method="attribution", check=10, bootstrap=50, floor=1e-4),
}
TABLES = {
    "modality-gap": {"modality_gap"},
    "cross-attention": {"cross_attention_by_layer", "cross_attention_roles", "cross_attention_top_positions"},
    "overlap": {"overlap"},
    "ablation": {"ablation"},
    "patching": {"patching", "patching_pairs"},
    "gate-scan": {"positions", "gate", "layers"},
}


@pytest.fixture(scope="module")
def native():
    """The shipped native organism: the ablation refuses a baseline at chance, which a random-weight model has."""
    import narrowgate as ng

    return ng.load("native", dtype="float32")


@pytest.mark.parametrize("case", sorted(CASES))
def test_experiment_writes_every_output(case, checkpoint_dir, loaded, native, tmp_path):
    name = case.split("-")[0] if case.startswith("ablation") else case.removesuffix("-attribution")
    organism = name == "ablation"
    vlm = native if organism else loaded("chameleon")
    cfg = dict(
        model="native" if organism else str(checkpoint_dir("chameleon")),
        data="synthetic",
        out=str(tmp_path / "run"),
        batch_size=2,
        progress=False,
        **CASES[case],
    )
    store = run(EXPERIMENTS[name](), cfg, vlm=vlm, command=["narrowgate", "run", name])
    manifest = json.loads(store.manifest_path.read_text())
    assert manifest["experiment"] == name and manifest["model"]["family"] == "chameleon"
    assert manifest["versions"]["transformers"] and manifest["config"]["seed"] == 42
    tables = store.tables()
    assert TABLES[name] <= set(tables) and "failures" in tables
    for t in TABLES[name]:
        assert len(tables[t]) > 0 and (store.path / "tables" / f"{t}.csv").stat().st_size > 0
    figures = sorted((store.path / "figures").iterdir())
    assert {p.suffix for p in figures} == {".png", ".pdf"} and all(p.stat().st_size > 1000 for p in figures)
    report = (store.path / "report.html").read_text()
    assert "data:image/png;base64" in report and name in report
    records = store.records()
    assert records.rows["example_id"].is_unique
    if name == "ablation":
        df = tables["ablation"]
        assert df["condition"].iloc[0] == "baseline"
        assert (df["score"].iloc[0] > df["chance"]).all() and df["relative"].notna().all()
        if case == "ablation-sweep":
            L = vlm.n_layers
            windows = {
                f"eoi->text@{L - w}-{L - 1}:mask" if w > 1 else f"eoi->text@{L - 1}:mask" for w in range(1, L + 1)
            }
            assert windows <= set(df["condition"])
        else:
            assert {"eoi->text", "image->text", "last_image->text", "eoi->eoi+text"} <= set(df["condition"])
    if name == "patching":
        df = tables["patching"]
        assert len(df) == vlm.n_layers and df["similarity"].between(0, 1).all()
    if name == "gate-scan":
        gate = tables["gate"].iloc[0]
        assert 0 <= gate["gate_index"] <= 1.5 and gate["positions_for_90"] >= 1 and gate["verdict"]
        assert tables["positions"]["damage"].is_monotonic_decreasing
        if case.endswith("attribution"):
            assert gate["n_exact"] == 10 and gate["n"] == 12 and -1 <= gate["spearman_logp"] <= 1
    if name == "cross-attention":
        df = tables["cross_attention_by_layer"]
        np.testing.assert_allclose(df.groupby("layer")["fraction"].sum(), 1.0, atol=1e-5)


def test_rerun_resumes_and_changed_config_is_refused(checkpoint_dir, loaded, tmp_path):
    vlm = loaded("chameleon")
    cfg = dict(
        model=str(checkpoint_dir("chameleon")),
        data="synthetic",
        out=str(tmp_path / "run"),
        progress=False,
        n_per_class=2,
        k=1,
    )
    first = run(EXPERIMENTS["overlap"](), cfg, vlm=vlm, command=["x"])
    n_parts = len(list((first.path / "records").glob("*.parquet")))
    again = run(EXPERIMENTS["overlap"](), cfg, vlm=vlm, command=["x"])
    assert len(list((again.path / "records").glob("*.parquet"))) == n_parts  # nothing recomputed
    with pytest.raises(ManifestMismatch, match="different config"):
        run(EXPERIMENTS["overlap"](), {**cfg, "image_index": 4}, vlm=vlm, command=["x"])


def test_the_memory_budget_applies_to_the_run_and_the_model_is_given_back(
    checkpoint_dir, loaded, tmp_path, monkeypatch
):
    """``memory_budget`` reaches every model call of the run, may change when resuming (it changes no result), and
    the model handed in keeps its own budget afterwards."""
    vlm = loaded("chameleon")
    seen = []
    original = vlm.forward_conditions
    monkeypatch.setattr(vlm, "forward_conditions", lambda *a, **k: seen.append(vlm.memory_budget) or original(*a, **k))
    cfg = dict(model=str(checkpoint_dir("chameleon")), data="synthetic", out=str(tmp_path / "run"), progress=False)
    run(EXPERIMENTS["overlap"](), {**cfg, "n_per_class": 2, "k": 1, "memory_budget": "64MiB"}, vlm=vlm, command=["x"])
    assert seen and set(seen) == {64 << 20} and vlm.memory_budget is None
    run(EXPERIMENTS["overlap"](), {**cfg, "n_per_class": 2, "k": 1, "memory_budget": "2GiB"}, vlm=vlm, command=["x"])
