"""Modality homogeneity of density-peak clusters (Sec. 4.1 and SM 7.5).

Image and text token representations are clustered with Advanced Density
Peaks (dadapy) and the clusters are scored with the homogeneity of their
modality composition: 1 when every cluster holds a single modality, lower as
modalities mix. Pipeline: rows L2-normalised; intrinsic dimension by Gride at
the scale of the 8th/16th neighbours; kNN density with k = 15 on that
dimension; ADP with merging parameter Z; optionally drop points of small
clusters; ``sklearn.metrics.homogeneity_score``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from dadapy import Data
from sklearn.metrics import homogeneity_score

__all__ = ["min_points", "modality_homogeneity"]


def min_points(id_range: tuple[int, int] = (8, 16), density_k: int = 15) -> int:
    """The fewest points `modality_homogeneity` can cluster: each needs ``max(n2, density_k)`` neighbours."""
    return max(id_range[1], density_k) + 1


def _as_unit_rows(X) -> np.ndarray:
    """float64 numpy copy of X with rows scaled to unit norm."""
    if isinstance(X, torch.Tensor):
        X = X.detach().to("cpu", torch.float64).numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be [N, D], got shape {X.shape}")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("X has all-zero rows, which have no direction to normalise")
    return X / norms


def modality_homogeneity(
    X,
    modality_labels: Sequence | np.ndarray,
    Z: float = 1.2,
    *,
    id_range: tuple[int, int] = (8, 16),
    density_k: int = 15,
    min_cluster_size: int | None = None,
    maxk: int = 100,
    halo: bool = False,
    seed: int = 42,
) -> float:
    """Homogeneity, with respect to ``modality_labels``, of the ADP clusters of X [N, D].

    Parameters (Gride ranks and density k as stated in the paper):

    - ``Z``: ADP merging parameter (statistical confidence of peaks); higher
      merges more.
    - ``id_range``: neighbour ranks (n1, n2 = 2 n1, n1 a power of two) of the
      Gride intrinsic-dimension estimate; (8, 16) is "rank 16" in the paper.
    - ``density_k``: neighbours of the kNN density estimate (15).
    - ``min_cluster_size``: points of clusters smaller than this are dropped
      before scoring. The paper drops small clusters; the authors' code keeps
      all, hence the default ``None`` (keep all).
    - ``maxk``: neighbours stored per point (default 100, dadapy's, capped at
      N - 1); ADP searches saddles among them, Gride and the density need at
      least n2 and ``density_k``.
    - ``halo``: passed to ADP; halo points (label -1) then form their own group.
    - ``seed``: seeds dadapy's random generator; the steps used here draw no
      random numbers, so the result does not depend on it.

    Distances are Euclidean on the normalised rows, so neighbourhoods are those
    of cosine similarity; zero distances (identical tokens, e.g. the same prompt
    word at the same position) are smeared with dadapy's ``remove_zero_dists``.
    Raises ValueError when every point would be dropped.
    """
    Xn = _as_unit_rows(X)
    labels = np.asarray(modality_labels)
    n = Xn.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"modality_labels must have shape ({n},), got {labels.shape}")
    n1, n2 = id_range
    if n1 < 1 or n2 != 2 * n1 or 2 ** int(round(math.log2(n1))) != n1:
        raise ValueError(f"id_range must be (n1, 2*n1) with n1 a power of two, got {id_range}")
    maxk = min(maxk, n - 1)
    if maxk < max(n2, density_k):
        raise ValueError(
            f"need more than max(n2={n2}, density_k={density_k}) points and maxk >= both; have N={n}, maxk={maxk}"
        )

    data = Data(coordinates=Xn, maxk=maxk, verbose=False)
    data.rng = np.random.default_rng(seed)
    with warnings.catch_warnings():  # dadapy warns about identical points; they are smeared just below
        warnings.filterwarnings("ignore", message="There are points with neighbours at 0 distance")
        data.compute_distances(maxk=maxk)
    data.distances = data.remove_zero_dists(data.distances)
    ids, _, ranks = data.return_id_scaling_gride(range_max=n2, return_ranks=True)
    data.set_id(float(ids[list(ranks).index(n2)]))
    data.compute_density_kNN(k=density_k)
    clusters = np.asarray(data.compute_clustering_ADP(Z=Z, halo=halo))

    if min_cluster_size is not None:
        _, inverse, counts = np.unique(clusters, return_inverse=True, return_counts=True)
        keep = counts[inverse.reshape(-1)] >= min_cluster_size
        if not keep.any():
            raise ValueError(f"no cluster has at least min_cluster_size={min_cluster_size} points")
        clusters, labels = clusters[keep], labels[keep]
    return float(homogeneity_score(labels, clusters))
