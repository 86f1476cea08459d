"""Image-text cosine statistics over pairs of different examples."""

import numpy as np
import pandas as pd
import pytest
import torch

from narrowgate.metrics import cosine_gap, cosine_gap_per_layer
from narrowgate.metrics.cosine import _sampled_pairs


def _brute_force(img, txt):
    a = img / np.linalg.norm(img, axis=1, keepdims=True)
    b = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    cos = a @ b.T
    values = cos[~np.eye(len(a), dtype=bool)]
    q25, med, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return {"median": med, "q25": q25, "q75": q75, "iqr": q75 - q25, "n_pairs": values.size}


@pytest.mark.parametrize("block_size", [None, 1, 5, 100])
def test_exact_matches_brute_force(block_size):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(37, 8)) + 0.5
    txt = rng.normal(size=(37, 8))
    got = cosine_gap(img, txt, block_size=block_size)
    expected = _brute_force(img, txt)
    assert got["n_pairs"] == 37 * 36
    for key in ("median", "q25", "q75", "iqr"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12)


def test_diagonal_pairs_are_excluded():
    # Row i of both matrices is the i-th basis vector: same-example pairs have cosine 1,
    # all others 0, so any leaked diagonal pair would raise the upper quantiles.
    eye = np.eye(6)
    stats = cosine_gap(eye, eye)
    assert stats == {"median": 0.0, "q25": 0.0, "q75": 0.0, "iqr": 0.0, "n_pairs": 30}
    eye_t = torch.eye(50, dtype=torch.float64)
    sampled = _sampled_pairs(eye_t, eye_t, 5000, seed=0)
    assert sampled.shape == (5000,) and np.all(sampled == 0.0)


def test_identical_vectors_have_median_one():
    v = np.tile(np.random.default_rng(1).normal(size=16), (20, 1))
    stats = cosine_gap(v, 3.0 * v)
    assert stats["median"] == pytest.approx(1.0)
    assert stats["iqr"] == pytest.approx(0.0, abs=1e-12)


def test_torch_float32_agrees_with_numpy():
    rng = np.random.default_rng(2)
    img, txt = rng.normal(size=(40, 12)), rng.normal(size=(40, 12))
    got = cosine_gap(torch.tensor(img, dtype=torch.float32), torch.tensor(txt, dtype=torch.float32))
    expected = _brute_force(img, txt)
    assert got["median"] == pytest.approx(expected["median"], abs=1e-5)
    assert got["iqr"] == pytest.approx(expected["iqr"], abs=1e-5)


def test_sampling_is_seeded_and_close_to_exact():
    rng = np.random.default_rng(3)
    img, txt = rng.normal(size=(300, 10)) + 0.3, rng.normal(size=(300, 10)) + 0.3
    exact = cosine_gap(img, txt)
    a = cosine_gap(img, txt, max_pairs=20_000, seed=7)
    b = cosine_gap(img, txt, max_pairs=20_000, seed=7)
    c = cosine_gap(img, txt, max_pairs=20_000, seed=8)
    assert a == b and a != c
    assert a["n_pairs"] == 20_000 and exact["n_pairs"] == 300 * 299
    for key in ("median", "q25", "q75"):
        assert a[key] == pytest.approx(exact[key], abs=0.02)


def test_per_layer_dataframe():
    rng = np.random.default_rng(4)
    img, txt = rng.normal(size=(3, 25, 6)), rng.normal(size=(3, 25, 6))
    df = cosine_gap_per_layer(img, txt)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["layer", "median", "q25", "q75", "iqr", "n_pairs"]
    assert df["layer"].tolist() == [0, 1, 2]
    for layer in range(3):
        expected = cosine_gap(img[layer], txt[layer])
        assert df.loc[layer, ["median", "q25", "q75", "iqr"]].tolist() == [
            expected[k] for k in ("median", "q25", "q75", "iqr")
        ]


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_gap(np.ones((4, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        cosine_gap(np.ones((1, 3)), np.ones((1, 3)))
    with pytest.raises(ValueError):
        cosine_gap_per_layer(np.ones((4, 3)), np.ones((4, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(5)
    img = torch.tensor(rng.normal(size=(120, 16)))
    txt = torch.tensor(rng.normal(size=(120, 16)))
    for max_pairs in (10**6, 500):
        gpu = cosine_gap(img.cuda(), txt.cuda(), max_pairs=max_pairs)
        cpu = cosine_gap(img, txt, max_pairs=max_pairs)
        assert gpu["n_pairs"] == cpu["n_pairs"]
        for key in ("median", "q25", "q75", "iqr"):
            assert gpu[key] == pytest.approx(cpu[key], abs=1e-12)
