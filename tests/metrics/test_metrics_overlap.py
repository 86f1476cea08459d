"""Neighbourhood overlap (Eq. 2) against a brute-force reference and against dadapy."""

import numpy as np
import pytest
import torch
from dadapy import Data

from narrowgate.metrics import neighborhood_overlap, neighborhood_overlap_per_layer


def _brute_force(X, labels, k, class_balanced=False):
    """Full distance matrix, self excluded, k nearest by sorting."""
    d = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :k]
    per_point = (labels[nn] == labels[:, None]).mean(axis=1)
    if not class_balanced:
        return per_point.mean()
    return np.mean([per_point[labels == c].mean() for c in np.unique(labels)])


def _clustered(n, d, n_classes, seed, imbalanced=False):
    """Gaussian classes with overlapping centres, so overlaps are strictly between 0 and 1."""
    rng = np.random.default_rng(seed)
    if imbalanced:
        labels = rng.choice(n_classes, size=n, p=np.arange(1, n_classes + 1) / np.arange(1, n_classes + 1).sum())
    else:
        labels = np.arange(n) % n_classes
    centres = rng.normal(size=(n_classes, d)) * 1.5
    return centres[labels] + rng.normal(size=(n, d)), labels


@pytest.mark.parametrize("k", [1, 5, 17, 60])
@pytest.mark.parametrize("class_balanced", [False, True])
def test_matches_brute_force(k, class_balanced):
    X, labels = _clustered(300, 12, 4, seed=k, imbalanced=True)
    expected = _brute_force(X, labels, k, class_balanced)
    assert 0.0 < expected < 1.0
    got = neighborhood_overlap(X, labels, k, class_balanced=class_balanced)
    assert got == pytest.approx(expected, abs=1e-12)


def test_blocking_does_not_change_the_result():
    X, labels = _clustered(257, 8, 3, seed=0)
    expected = _brute_force(X, labels, 10)
    for block_size in (1, 7, 64, 1000):
        assert neighborhood_overlap(X, labels, 10, block_size=block_size) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("k", [3, 30])
def test_matches_dadapy(k):
    X, labels = _clustered(400, 10, 5, seed=1, imbalanced=True)
    data = Data(coordinates=X.copy(), maxk=100, verbose=False)
    balanced = data.return_label_overlap(labels, k=k)
    plain = data.return_label_overlap(labels, k=k, weighted=False)
    assert balanced != pytest.approx(plain)
    assert neighborhood_overlap(X, labels, k, class_balanced=True) == pytest.approx(balanced, abs=1e-12)
    assert neighborhood_overlap(X, labels, k) == pytest.approx(plain, abs=1e-12)


def test_balanced_classes_give_same_value_both_ways():
    X, labels = _clustered(240, 6, 4, seed=2)
    assert neighborhood_overlap(X, labels, 8, class_balanced=True) == pytest.approx(
        neighborhood_overlap(X, labels, 8), abs=1e-12
    )


def test_torch_float32_input_and_string_labels():
    X, labels = _clustered(200, 16, 3, seed=3)
    names = np.array(["cat", "dog", "eel"])[labels]
    expected = _brute_force(X, labels, 9)
    assert neighborhood_overlap(torch.tensor(X, dtype=torch.float32), list(names), 9) == pytest.approx(expected)
    assert neighborhood_overlap(X, torch.tensor(labels), 9) == pytest.approx(expected, abs=1e-12)


def test_extremes():
    # Two far-apart groups, labelled by group: every neighbour agrees.
    rng = np.random.default_rng(4)
    X = np.concatenate([rng.normal(size=(50, 3)), rng.normal(size=(50, 3)) + 100.0])
    labels = np.repeat([0, 1], 50)
    assert neighborhood_overlap(X, labels, 20) == 1.0
    # Alternating labels across the groups at k = 49 (the whole group): 24 of 49 agree.
    alternating = np.arange(100) % 2
    assert neighborhood_overlap(X, alternating, 49) == pytest.approx(24 / 49)


def test_per_layer():
    layers = [_clustered(150, 5, 3, seed=s)[0] for s in range(3)]
    labels = np.arange(150) % 3
    stacked = np.stack(layers)
    result = neighborhood_overlap_per_layer(stacked, labels, k=7)
    assert isinstance(result, np.ndarray) and result.shape == (3,) and result.dtype == np.float64
    np.testing.assert_allclose(result, [_brute_force(x, labels, 7) for x in layers], atol=1e-12)
    np.testing.assert_allclose(
        neighborhood_overlap_per_layer(torch.from_numpy(stacked), labels, k=7), result, atol=1e-12
    )


def test_bad_arguments_raise():
    X, labels = _clustered(20, 3, 2, seed=5)
    with pytest.raises(ValueError, match="k=20"):
        neighborhood_overlap(X, labels, k=20)
    with pytest.raises(ValueError, match="at least 1"):
        neighborhood_overlap(X, labels, k=0)
    with pytest.raises(ValueError, match="19 entries"):
        neighborhood_overlap(X, labels[:-1], k=3)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        neighborhood_overlap(X[None], labels, k=3)
    with pytest.raises(ValueError, match="k=20"):
        neighborhood_overlap_per_layer(X[None], labels, k=20)
    neighborhood_overlap(X, labels, k=19)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    X, labels = _clustered(500, 32, 5, seed=6, imbalanced=True)
    Xt = torch.tensor(X, dtype=torch.float64)
    for balanced in (False, True):
        assert neighborhood_overlap(Xt.cuda(), labels, 10, class_balanced=balanced) == pytest.approx(
            neighborhood_overlap(Xt, labels, 10, class_balanced=balanced), abs=1e-12
        )
