"""How a run stores its arrays: residuals as bfloat16 (no float16 overflow), read back as float32; a non-finite
residual is refused naming its example and residual index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from narrowgate import Capture, NarrowgateError
from narrowgate.analyses import EXPERIMENTS
from narrowgate.runner import run
from narrowgate.store import BFloat16, NonFiniteResidual, RunStore


def _bf16(x: np.ndarray) -> np.ndarray:
    """torch's float32 -> bfloat16 conversion (round to nearest even), back to float32: the reference."""
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).to(torch.bfloat16).float().numpy()


def test_residuals_round_trip_as_bfloat16_beyond_float16s_range(tmp_path):
    values = np.random.default_rng(0).normal(0, 1, (3, 4, 8)).astype(np.float32)
    values[0, 2, :3] = [1e5, -7e4, 3.0e38]  # float16 overflows above 65,504
    plain = np.arange(3, dtype=np.float32) / 7
    store = RunStore(tmp_path)
    store.write([{"example_id": f"e{i}"} for i in range(3)], {"res": BFloat16(values, (0, 1, 2, 3)), "plain": plain})
    got = store.records().arrays
    assert got["res"].dtype == np.float32 and np.isfinite(got["res"]).all()
    np.testing.assert_array_equal(got["res"], _bf16(values))
    assert np.all(np.abs(got["res"] - values) <= np.abs(values) * 2.0**-8)
    np.testing.assert_array_equal(got["plain"], plain)  # other arrays are stored as they are
    with np.errstate(over="ignore"):
        assert np.isinf(np.float16(1e5))  # what the float16 store did to such a residual


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_non_finite_residual_is_refused_naming_example_and_resid(tmp_path, bad):
    values = np.zeros((2, 3, 4), dtype=np.float32)
    values[1, 2, 0] = bad
    store = RunStore(tmp_path)
    with pytest.raises(NonFiniteResidual, match=r"example e1: a non-finite residual .* in '0:eoi' at resid 7"):
        store.write([{"example_id": "e0"}, {"example_id": "e1"}], {"0:eoi": BFloat16(values, (5, 6, 7))})
    with pytest.raises(NonFiniteResidual, match=r"example e1: .* at resid 32"):
        store.write([{"example_id": "e0"}, {"example_id": "e1"}], {"last": BFloat16(values[:, 2], (32,))})
    assert store.records().rows.empty  # nothing half-written


def test_overlap_stores_large_activations_and_refuses_overflowed_ones(checkpoint_dir, loaded, tmp_path):
    vlm = loaded("chameleon")
    embed = vlm.model.get_input_embeddings().weight
    original = embed.data.clone()
    cfg = dict(model=str(checkpoint_dir("chameleon")), data="synthetic", n_per_class=2, k=1, progress=False)
    try:
        embed.data.mul_(1e8)  # residuals far above float16's 65,504
        store = run(EXPERIMENTS["overlap"](), {**cfg, "out": str(tmp_path / "large")}, vlm=vlm, command=["t"])
        arrays, rows = store.records().arrays, store.records().rows
        assert np.isfinite(arrays["0:eoi"]).all() and np.abs(arrays["0:eoi"]).max() > 65504
        from narrowgate.data import tasks

        example = {e.id: e for e in tasks.load("synthetic", "classes", None, seed=42, n_per_class=2)}[
            rows["example_id"].iloc[0]
        ]
        want = vlm.forward(vlm.prepare([example.load_image()], ["This shape is a"]), capture=Capture("eoi"))
        np.testing.assert_array_equal(arrays["0:eoi"][0], _bf16(want.residuals["eoi"][0].numpy()))
        embed.data.fill_(float("inf"))  # activations that overflowed (as a float16 model's can)
        with pytest.raises(NarrowgateError, match=r"non-finite residual .* at resid 0"):
            run(EXPERIMENTS["overlap"](), {**cfg, "out": str(tmp_path / "inf")}, vlm=vlm, command=["t"])
        failures = RunStore(tmp_path / "inf").failures()
        assert len(failures) == 12 and failures["reason"].str.contains("at resid 0").all()
    finally:
        embed.data.copy_(original)
