"""The paper's and the authors' variants: overlap under early-layer knockouts and its extra roles, layer outputs
only, Fig. 3 normalised after averaging, patching from layer l to the end."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from narrowgate import Capture
from narrowgate.analyses import EXPERIMENTS
from narrowgate.analyses.cross_attention import CrossAttention
from narrowgate.analyses.overlap import OverlapConfig, windows
from narrowgate.analyses.patching import pair_order, patch_conditions
from narrowgate.data import by_label, tasks
from narrowgate.data.prompts import class_prompt
from narrowgate.engine.interventions import Patch
from narrowgate.metrics import distribution_similarity
from narrowgate.runner import run


def _cfg(checkpoint_dir, tmp_path, family="chameleon", **kw):
    return dict(
        model=str(checkpoint_dir(family)), data="synthetic", out=str(tmp_path), progress=False, batch_size=8, **kw
    )


def test_sweep_windows_grow_from_layer_zero_and_end_with_every_layer():
    assert windows(OverlapConfig(sweep=True, sweep_step=2), 5) == [(0, 1), (0, 1, 2, 3), (0, 1, 2, 3, 4)]
    assert windows(OverlapConfig(sweep=True, sweep_step=1), 2) == [(0,), (0, 1)]
    # the authors' windows: layers 0..w-1 for w = 4, 8, ... (their range(0, L, 4)), and every layer
    assert [len(w) for w in windows(OverlapConfig(sweep=True, sweep_step=4), 10)] == [4, 8, 10]
    assert windows(OverlapConfig(), 4) == []


def test_overlap_under_early_knockouts_blinds_eoi_up_to_the_window(checkpoint_dir, loaded, tmp_path):
    vlm = loaded("chameleon")
    L = vlm.n_layers
    store = run(
        EXPERIMENTS["overlap"](),
        _cfg(checkpoint_dir, tmp_path, n_per_class=3, k=2, sweep=True, sweep_step=1, mode="mask"),
        vlm=vlm,
        command=["x"],
    )
    table = store.tables()["overlap"]
    kinds = ["eoi->eoi+text", "image->text", "image->eoi+text"]
    names = ["none"] + [
        f"{kind}@0-{w - 1}:mask" if w > 1 else f"{kind}@0:mask" for kind in kinds for w in range(1, L + 1)
    ]
    assert list(table["knockout"].drop_duplicates()) == names
    roles = {"eoi", "first_image", "last_image", "internal_image", "last"}
    for _, g in table.groupby("knockout"):
        assert roles <= set(g["role"]) and "eol" not in set(g["role"])  # Chameleon has no line breaks
        assert sorted(g["resid"].unique()) == list(range(L + 1))
    arrays = store.records().arrays
    for i in range(1, L + 1):  # image -> eoi+text in 0..i-1: the eoi residual cannot depend on the image up to resid i
        eoi = arrays[f"{2 * L + i}:eoi"]
        assert (eoi[:, : i + 1] == eoi[:1, : i + 1]).all()
        if i < L:
            assert not (eoi[:, i + 1] == eoi[:1, i + 1]).all()
        # image -> text leaves [EOI] reading the image
        assert not (arrays[f"{L + i}:eoi"][:, 1] == arrays[f"{L + i}:eoi"][:1, 1]).all()
    base = arrays["0:eoi"]
    assert not (base[:, L] == base[:1, L]).all()
    # the authors' overlap-with-ablation: last after the last layer, one row per knockout and window (0 = none)
    sweep = store.tables()["overlap_sweep"]
    assert list(sweep["sweep"].drop_duplicates()) == kinds
    for kind in kinds:
        rows = sweep[sweep["sweep"] == kind]
        assert list(rows["layers_knocked_out"]) == list(range(L + 1))
        full = table[(table["role"] == "last") & (table["resid"] == L)].set_index("knockout")["overlap"]
        assert list(rows["overlap"]) == [full[n] for n in rows["knockout"]]


def test_sweep_captures_equal_direct_forwards_with_the_same_knockout(checkpoint_dir, loaded, tmp_path):
    from narrowgate import Knockout

    vlm = loaded("chameleon")
    store = run(
        EXPERIMENTS["overlap"](),
        _cfg(checkpoint_dir, tmp_path, n_per_class=2, k=1, sweep=True, sweep_step=2),
        vlm=vlm,
        command=["x"],
    )
    records = store.records()
    example = {e.id: e for e in tasks.load("synthetic", "classes", None, seed=42, n_per_class=2)}[
        records.rows.loc[0, "example_id"]
    ]
    batch = vlm.prepare([example.load_image()], ["This shape is a"])
    names = list(store.tables()["overlap"]["knockout"].drop_duplicates())
    for i, name in enumerate(names[1:], start=1):
        kind, layers = name.split("@")
        src, tgt = kind.split("->")
        lo, _, hi = layers.partition("-")
        ko = Knockout(src, tuple(tgt.split("+")), layers=tuple(range(int(lo), int(hi or lo) + 1)))
        want = vlm.forward(batch, knockouts=[ko], capture=Capture("last")).residuals["last"][0]
        got = torch.as_tensor(records.arrays[f"{i}:last"][0], dtype=torch.float32)
        torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=2**-7, msg=name)  # stored as bfloat16


def test_overlap_reads_pixtral_eol_mean_and_outputs_only_drops_the_embeddings(checkpoint_dir, loaded, tmp_path):
    vlm = loaded("pixtral")
    cfg = _cfg(checkpoint_dir, tmp_path / "all", "pixtral", n_per_class=3, k=2)
    full = run(EXPERIMENTS["overlap"](), cfg, vlm=vlm, command=["x"]).tables()["overlap"]
    assert {"eol", "first_image"} <= set(full["role"])
    cfg = _cfg(checkpoint_dir, tmp_path / "outputs", "pixtral", n_per_class=3, k=2, outputs_only=True)
    store = run(EXPERIMENTS["overlap"](), cfg, vlm=vlm, command=["x"])
    outputs = store.tables()["overlap"]
    assert sorted(outputs["resid"].unique()) == list(range(1, vlm.n_layers + 1))
    merged = outputs.merge(full, on=["resid", "role"], suffixes=("", "_full"))
    assert len(merged) == len(outputs)
    np.testing.assert_array_equal(merged["overlap"], merged["overlap_full"])
    # the eol capture is the mean of the [IMG_BREAK] residuals
    examples = tasks.load("synthetic", "classes", None, seed=42, n_per_class=1)[:2]
    batch = vlm.prepare([e.load_image() for e in examples], ["This shape is a"] * 2)
    with torch.no_grad():
        hidden = vlm.model(**batch.inputs, output_hidden_states=True).hidden_states
    got = vlm.forward(batch, capture=Capture("eol")).residuals["eol"]
    for b, pos in enumerate(batch.positions("eol")):
        assert len(pos) > 1
        want = torch.stack([h[b, pos].mean(0) for h in hidden[:-1]])  # HF's last one is after the final norm
        torch.testing.assert_close(got[b, :-1], want, rtol=1e-5, atol=1e-5)


def _planted(masses: list[list[float]]):
    """Cross-attention records of one layer over positions (image[0], image[1], eoi)."""
    rows = []
    for i, m in enumerate(masses):
        m = np.asarray(m, dtype=np.float64)
        rows.append(
            {
                "example_id": str(i),
                "label": "a",
                "n_content": 2,
                "positions": ["image[0]", "image[1]", "eoi"],
                "fractions": (m / m.sum()).tolist(),
                "mass": m.tolist(),
            }
        )
    return SimpleNamespace(rows=pd.DataFrame(rows), arrays={})


@pytest.mark.parametrize(
    ("normalise", "eoi", "first"),
    [("per-example", (0.5 + 0.125) / 2, (0.25 + 0.75) / 2), ("after-mean", 1.5 / 6, 3.5 / 6)],
)
def test_cross_attention_normalises_per_example_or_after_the_mean(normalise, eoi, first):
    records = _planted([[1.0, 1.0, 2.0], [6.0, 1.0, 1.0]])
    cfg = CrossAttention.config(normalise=normalise)
    tables = CrossAttention().aggregate(records, cfg, {"n_layers": 1})
    roles = tables["cross_attention_roles"].set_index("role")["fraction"]
    assert roles["eoi"] == pytest.approx(eoi)
    assert roles["first_image"] == pytest.approx(first)
    assert roles["last_image"] == pytest.approx(1 - eoi - first)


def test_cross_attention_records_the_raw_mass_behind_each_share(checkpoint_dir, loaded, tmp_path):
    vlm = loaded("chameleon")
    store = run(
        EXPERIMENTS["cross-attention"](),
        _cfg(checkpoint_dir, tmp_path, n_per_class=1, normalise="after-mean"),
        vlm=vlm,
        command=["x"],
    )
    for _, row in store.records().rows.iterrows():
        mass = np.asarray(row["mass"]).reshape(vlm.n_layers, -1)
        frac = np.asarray(row["fractions"]).reshape(vlm.n_layers, -1)
        np.testing.assert_allclose(mass / mass.sum(1, keepdims=True), frac, rtol=1e-5)
    by_layer = store.tables()["cross_attention_by_layer"]
    np.testing.assert_allclose(by_layer.groupby("layer")["fraction"].sum(), 1.0, rtol=1e-6)


def test_patching_from_l_patches_every_later_index_and_matches_direct_forwards(checkpoint_dir, loaded, tmp_path):
    vlm = loaded("chameleon")
    L = vlm.n_layers
    donor = torch.randn(1, L + 1, vlm.model.config.get_text_config().hidden_size)
    conds = patch_conditions(donor, L, "from")
    assert [sorted(p.resid for p in c.patches) for c in conds[1:]] == [list(range(l, L)) for l in range(L)]
    single = run(
        EXPERIMENTS["patching"](), _cfg(checkpoint_dir, tmp_path / "single", n_per_class=2), vlm=vlm, command=["x"]
    )
    spans = run(
        EXPERIMENTS["patching"](),
        _cfg(checkpoint_dir, tmp_path / "from", n_per_class=2, span="from"),
        vlm=vlm,
        command=["x"],
    )
    a, b = single.tables()["patching"], spans.tables()["patching"]
    assert b["patched"].iloc[0] == "eoi, resid l..L-1"
    last = a["resid"] == L - 1  # one site either way
    np.testing.assert_allclose(a.loc[last, "similarity"], b.loc[last, "similarity"], rtol=1e-6)
    # every per-example number of the "from" run equals a direct forward with the same patches
    records = spans.records()
    base_id, target_id = records.rows.loc[0, ["base_image", "target_image"]]
    examples = {e.id: e for e in tasks.load("synthetic", "classes", None, seed=42, n_per_class=2, classes="pairs")}
    prompt = class_prompt(None, "synthetic")
    base = vlm.prepare([examples[base_id].load_image()], [prompt])
    target = vlm.prepare([examples[target_id].load_image()], [prompt])
    t = vlm.forward(target, capture=Capture("eoi"))
    p_target = torch.softmax(t.logits[:, -1].float(), -1)
    for l in range(L):
        patches = [Patch("eoi", j, t.residuals["eoi"][:, j]) for j in range(l, L)]
        p = torch.softmax(vlm.forward(base, patches=patches).logits[:, -1].float(), -1)
        want = float(distribution_similarity(p, p_target)[0])
        assert records.arrays["similarity"][0, l] == pytest.approx(want, abs=1e-5)
    assert len(by_label([examples[base_id], examples[target_id]])) == 2
    assert (records.rows.loc[0, "base"], records.rows.loc[0, "target"]) in pair_order("synthetic")
