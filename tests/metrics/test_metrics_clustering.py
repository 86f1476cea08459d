"""Modality homogeneity of ADP clusters on planted blobs."""

import numpy as np
import pytest
import torch

from narrowgate.metrics import modality_homogeneity


def _blobs(sizes, seed, dim=10, radius=10.0, noise=0.5):
    """Gaussian blobs around random directions (far apart also after row normalisation)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    centres *= radius / np.linalg.norm(centres, axis=1, keepdims=True)
    X = np.concatenate([c + noise * rng.normal(size=(s, dim)) for c, s in zip(centres, sizes)])
    blob = np.repeat(np.arange(len(sizes)), sizes)
    return X, blob


def test_separated_modalities_are_homogeneous():
    X, blob = _blobs([60] * 6, seed=0)
    modality = (blob >= 3).astype(int)
    assert modality_homogeneity(X, modality) == pytest.approx(1.0)
    assert modality_homogeneity(torch.tensor(X, dtype=torch.float32), modality) == pytest.approx(1.0)


def test_mixed_modalities_score_low():
    X, _ = _blobs([60] * 6, seed=0)
    alternating = np.arange(len(X)) % 2
    assert modality_homogeneity(X, alternating) == pytest.approx(0.0, abs=1e-9)
    shuffled = np.random.default_rng(1).permutation(np.repeat([0, 1], 180))
    assert modality_homogeneity(X, shuffled) < 0.1


def test_exact_value_and_small_cluster_removal():
    # Two pure blobs of 100 and a mixed blob of 30 (15 + 15). With three clusters,
    # H(C) = ln 2 and H(C|K) = (30/230) ln 2, so homogeneity = 1 - 30/230 = 20/23.
    X, blob = _blobs([100, 100, 30], seed=1)
    modality = np.where(blob == 2, np.arange(len(X)) % 2, blob)
    assert modality_homogeneity(X, modality) == pytest.approx(20 / 23)
    assert modality_homogeneity(X, modality, min_cluster_size=1) == pytest.approx(20 / 23)
    assert modality_homogeneity(X, modality, min_cluster_size=31) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="min_cluster_size=101"):
        modality_homogeneity(X, modality, min_cluster_size=101)


def test_string_labels_and_parameters_pass_through():
    X, blob = _blobs([60] * 4, seed=2)
    modality = np.where(blob < 2, "image", "text")
    assert modality_homogeneity(X, modality, Z=2.0, id_range=(4, 8), density_k=10, maxk=40) == pytest.approx(1.0)


def test_bad_arguments_raise():
    X, blob = _blobs([30, 30], seed=3)
    with pytest.raises(ValueError, match="modality_labels"):
        modality_homogeneity(X, blob[:-1])
    with pytest.raises(ValueError, match="id_range"):
        modality_homogeneity(X, blob, id_range=(8, 12))
    with pytest.raises(ValueError, match="id_range"):
        modality_homogeneity(X, blob, id_range=(6, 12))
    with pytest.raises(ValueError, match="N=12"):
        modality_homogeneity(X[:12], blob[:12])
    with pytest.raises(ValueError, match="all-zero"):
        modality_homogeneity(np.vstack([X, np.zeros((1, X.shape[1]))]), np.append(blob, 0))
