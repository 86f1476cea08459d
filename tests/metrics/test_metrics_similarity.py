"""Histogram intersection (Eq. 3) and weighted Jaccard on numpy and torch inputs."""

import numpy as np
import pytest
import torch

from narrowgate.metrics import distribution_similarity, weighted_jaccard


def _random_simplex(shape, seed):
    x = np.random.default_rng(seed).random(shape)
    return x / x.sum(axis=-1, keepdims=True)


def test_known_values():
    p = np.array([0.5, 0.5, 0.0])
    q = np.array([0.0, 0.5, 0.5])
    assert distribution_similarity(p, q) == pytest.approx(0.5)
    assert weighted_jaccard(p, q) == pytest.approx(0.5 / 1.5)


def test_identical_and_disjoint():
    p = _random_simplex((7,), 0)
    assert distribution_similarity(p, p) == pytest.approx(1.0)
    assert weighted_jaccard(p, p) == pytest.approx(1.0)
    a, b = np.array([0.3, 0.7, 0.0, 0.0]), np.array([0.0, 0.0, 0.6, 0.4])
    assert distribution_similarity(a, b) == 0.0
    assert weighted_jaccard(a, b) == 0.0


def test_batched_matches_loop_and_broadcasts():
    p = _random_simplex((3, 4, 11), 1)
    q = _random_simplex((3, 4, 11), 2)
    sim, jac = distribution_similarity(p, q), weighted_jaccard(p, q)
    assert sim.shape == jac.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert sim[i, j] == pytest.approx(np.minimum(p[i, j], q[i, j]).sum())
            assert jac[i, j] == pytest.approx(np.minimum(p[i, j], q[i, j]).sum() / np.maximum(p[i, j], q[i, j]).sum())
    target = q[0, 0]
    np.testing.assert_allclose(distribution_similarity(p, target), np.minimum(p, target).sum(-1))


def test_torch_in_torch_out():
    p = torch.softmax(torch.randn(5, 13, dtype=torch.float64), dim=-1)
    q = torch.softmax(torch.randn(5, 13, dtype=torch.float64), dim=-1)
    sim, jac = distribution_similarity(p, q), weighted_jaccard(p, q)
    assert isinstance(sim, torch.Tensor) and isinstance(jac, torch.Tensor)
    np.testing.assert_allclose(sim.numpy(), distribution_similarity(p.numpy(), q.numpy()))
    np.testing.assert_allclose(jac.numpy(), weighted_jaccard(p.numpy(), q.numpy()))
    assert isinstance(distribution_similarity(p.numpy(), q), torch.Tensor)


def test_numpy_in_numpy_out_and_bounds():
    p, q = _random_simplex((50, 9), 3), _random_simplex((50, 9), 4)
    sim, jac = distribution_similarity(p, q), weighted_jaccard(p, q)
    assert isinstance(sim, np.ndarray) and isinstance(jac, np.ndarray)
    assert np.all((jac >= 0) & (jac <= sim) & (sim <= 1))
    # For probability vectors sum(max) = 2 - sum(min), so J = S / (2 - S).
    np.testing.assert_allclose(jac, sim / (2 - sim))


def test_weighted_jaccard_of_zero_vectors_is_one():
    z = np.zeros((2, 4))
    np.testing.assert_array_equal(weighted_jaccard(z, z), [1.0, 1.0])
    assert torch.equal(weighted_jaccard(torch.zeros(3), torch.zeros(3)), torch.tensor(1.0))
