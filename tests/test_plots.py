"""Figures and `compare`: one relative-depth convention, and the paper's layer axis on the figures that reproduce it."""

from __future__ import annotations

import pandas as pd
import pytest

from narrowgate import plots
from narrowgate.analyses import EXPERIMENTS
from narrowgate.runner import run


def test_relative_depth_is_resid_over_l_and_a_decoder_layer_sits_at_its_input():
    L = 4
    resid = pd.DataFrame({"resid": range(L + 1)})
    layer = pd.DataFrame({"layer": range(L)})
    assert list(plots.depth_axis(resid, L)) == [0, 0.25, 0.5, 0.75, 1.0]
    # cross-attention (decoder layers) and patching (resid 0..L-1, the residual entering layer l) line up
    assert list(plots.depth_axis(layer, L)) == list(plots.depth_axis(resid.iloc[:L], L))


def test_paper_axis_draws_the_layer_outputs_as_layers_0_to_l_minus_1():
    df = pd.DataFrame({"resid": range(5), "v": range(5)})
    rows, x, label = plots.resid_axis(df, "paper")
    assert list(rows["resid"]) == [1, 2, 3, 4] and list(x) == [0, 1, 2, 3] and label == plots.PAPER_LAYER
    assert plots.resid_axis(df)[2] == plots.PAPER_LAYER  # the default
    rows, x, label = plots.resid_axis(df, "resid")
    assert list(x) == [0, 1, 2, 3, 4] and label == plots.RESID


@pytest.mark.parametrize("axis", ["paper", "resid"])
def test_overlap_and_modality_gap_figures_use_the_axis(axis, checkpoint_dir, loaded, tmp_path, monkeypatch):
    drawn = {}
    real_save = plots.save

    def save(fig, store, name):
        ax = fig.axes[0]
        drawn[name] = (ax.get_xlabel(), sorted({float(v) for line in ax.get_lines() for v in line.get_xdata()}))
        return real_save(fig, store, name)

    monkeypatch.setattr(plots, "save", save)
    vlm = loaded("chameleon")
    L = vlm.n_layers
    base = dict(model=str(checkpoint_dir("chameleon")), data="synthetic", progress=False, batch_size=8)
    kw = {} if axis == "paper" else {"axis": "resid"}
    store = run(EXPERIMENTS["overlap"](), {**base, "out": str(tmp_path / "o"), "n_per_class": 2, "k": 1, **kw}, vlm=vlm)
    run(EXPERIMENTS["modality-gap"](), {**base, "out": str(tmp_path / "m"), "n": 20, **kw}, vlm=vlm)
    want = (
        (plots.PAPER_LAYER, [float(l) for l in range(L)])
        if axis == "paper"
        else (plots.RESID, [float(r) for r in range(L + 1)])
    )
    assert drawn["overlap"] == want and drawn["modality_gap"] == want
    assert "image[30]" in set(store.tables()["overlap"]["role"])  # the paper's "32nd image token"
    assert "axis" not in json_config(store) and (axis == "paper" or run_settings(store)["axis"] == "resid")


def json_config(store) -> dict:
    import json

    return json.loads(store.manifest_path.read_text())["config"]


def run_settings(store) -> dict:
    import json

    return json.loads(store.manifest_path.read_text())["run"]
