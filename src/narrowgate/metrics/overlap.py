"""Neighbourhood overlap of representations with a labelling (Eq. 2 of the paper).

For each point, the fraction of its k nearest neighbours (Euclidean, the point
itself excluded) that carry its label, averaged over points. Nearest
neighbours are found with blocked matrix products in torch, keeping only the
top-k of each block of query rows, so 10^4 x 4096 inputs run in seconds and no
N x N matrix is ever held when N is large. CPU and CUDA tensors both work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ..errors import DataError, OptionError

logger = logging.getLogger("narrowgate.run")

__all__ = [
    "check_k",
    "overlap_k",
    "neighborhood_overlap",
    "neighborhood_overlap_per_layer",
    "neighborhood_overlap_per_point",
]

# Query rows per block are chosen so that one block of scores holds about this
# many elements (2**26 float32 = 256 MiB).
_BLOCK_ELEMENTS = 2**26


def _as_float_tensor(X) -> torch.Tensor:
    """Torch view of X; float64 stays float64, every other dtype becomes float32."""
    t = torch.as_tensor(X).detach()
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    return t


def _encode_labels(labels, n: int, device: torch.device) -> torch.Tensor:
    """Map arbitrary hashable labels to integer codes on ``device``; check the length."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"labels has {arr.shape[0]} entries but X has {n} points")
    _, codes = np.unique(arr, return_inverse=True)
    return torch.as_tensor(codes.reshape(-1), dtype=torch.long, device=device)


def _knn_indices(X: torch.Tensor, k: int, block_size: int | None) -> torch.Tensor:
    """Indices [N, k] of each row's k nearest other rows (Euclidean), by blocks of query rows."""
    n = X.shape[0]
    if block_size is None:
        block_size = max(1, min(n, _BLOCK_ELEMENTS // max(n, 1)))
    sq_norms = (X * X).sum(dim=1)
    out = torch.empty((n, k), dtype=torch.long, device=X.device)
    for start in range(0, n, block_size):
        stop = min(n, start + block_size)
        # ||x_i - x_j||^2 up to the term ||x_i||^2, constant along a row.
        scores = sq_norms[None, :] - 2.0 * (X[start:stop] @ X.T)
        rows = torch.arange(stop - start, device=X.device)
        scores[rows, rows + start] = float("inf")
        out[start:stop] = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
    return out


def _per_point_overlap(X: torch.Tensor, codes: torch.Tensor, k: int, block_size: int | None) -> torch.Tensor:
    """Fraction of same-label points among each point's k nearest neighbours."""
    idx = _knn_indices(X, k, block_size)
    return (codes[idx] == codes[:, None]).to(torch.float64).mean(dim=1)


def _reduce(per_point: torch.Tensor, codes: torch.Tensor, class_balanced: bool) -> float:
    """Plain mean over points, or mean over classes of the per-class means."""
    if not class_balanced:
        return float(per_point.mean())
    n_classes = int(codes.max()) + 1
    sums = torch.zeros(n_classes, dtype=torch.float64, device=codes.device).index_add_(0, codes, per_point)
    counts = torch.bincount(codes, minlength=n_classes).to(torch.float64)
    return float((sums / counts).mean())


def _check_k(k: int, n: int) -> None:
    """k must lie in [1, N - 1]: the point itself is never its own neighbour."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k >= n:
        raise ValueError(f"k={k} needs more than k points (self excluded), but there are only {n}")


@torch.no_grad()
def neighborhood_overlap(
    X,
    labels: Sequence | np.ndarray | torch.Tensor,
    k: int = 30,
    *,
    class_balanced: bool = False,
    block_size: int | None = None,
) -> float:
    """Neighbourhood overlap chi^k of points X [N, D] with ``labels`` [N].

    Mean over points of the fraction of their ``k`` nearest neighbours
    (Euclidean, the point itself excluded) that share their label. With
    ``class_balanced=True`` the per-point values are first averaged within each
    class and then over classes, as dadapy's ``return_label_overlap`` does by
    default (``weighted=True``); on balanced classes both coincide. dadapy drops
    the first neighbour of each point assuming it is the point itself, which
    differs from this only when points are duplicated. Computation runs where X
    lives (numpy input: CPU) in X's precision (float64 kept, else float32);
    ``block_size`` query rows are scored at a time (default: about 2**26
    scores per block).
    """
    Xt = _as_float_tensor(X)
    if Xt.ndim != 2:
        raise ValueError(f"X must be [N, D], got shape {tuple(Xt.shape)}")
    n = Xt.shape[0]
    codes = _encode_labels(labels, n, Xt.device)
    _check_k(k, n)
    per_point = _per_point_overlap(Xt, codes, int(k), block_size)
    return _reduce(per_point, codes, class_balanced)


@torch.no_grad()
def neighborhood_overlap_per_point(
    X, labels: Sequence | np.ndarray | torch.Tensor, k: int = 30, *, block_size: int | None = None
) -> np.ndarray:
    """Each point's fraction of its ``k`` nearest neighbours sharing its label, float64 [N]; their mean is
    :func:`neighborhood_overlap` (and their spread gives its standard error over points)."""
    Xt = _as_float_tensor(X)
    if Xt.ndim != 2:
        raise ValueError(f"X must be [N, D], got shape {tuple(Xt.shape)}")
    n = Xt.shape[0]
    codes = _encode_labels(labels, n, Xt.device)
    _check_k(k, n)
    return _per_point_overlap(Xt, codes, int(k), block_size).cpu().numpy()


def neighborhood_overlap_per_layer(
    X,
    labels: Sequence | np.ndarray | torch.Tensor,
    k: int = 30,
    *,
    class_balanced: bool = False,
    block_size: int | None = None,
) -> np.ndarray:
    """Neighbourhood overlap of each layer of X [n_layers, N, D]; returns a float64 array [n_layers].

    Same definition and options as :func:`neighborhood_overlap`; layers are
    processed one at a time, so only one layer is ever converted or moved.
    """
    if X.ndim != 3:
        raise ValueError(f"X must be [n_layers, N, D], got shape {tuple(X.shape)}")
    n_layers, n = X.shape[0], X.shape[1]
    _check_k(k, n)
    result = np.empty(n_layers, dtype=np.float64)
    for layer in range(n_layers):
        result[layer] = neighborhood_overlap(X[layer], labels, k, class_balanced=class_balanced, block_size=block_size)
    return result


def _smallest_class(labels: Iterable) -> tuple:
    counts: dict = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    label, smallest = min(counts.items(), key=lambda kv: kv[1])
    return label, smallest, len(counts)


def check_k(labels: Iterable, k: int) -> None:
    """Refuse a neighbourhood overlap whose k the smallest class cannot support, before the model loads.

    With k above (smallest class - 1) not even a perfect representation can score 1, and with
    k >= N - 1 every representation scores the same number: the result would measure the sample size.
    """
    labels = list(labels)
    if not labels:
        return
    label, smallest, n_classes = _smallest_class(labels)
    if k > smallest - 1:
        raise OptionError(
            f"--k {k} needs at least {k + 1} examples per class, but class {label!r} has {smallest} "
            f"({len(labels)} examples in {n_classes} classes): raise --n-per-class / --n or lower --k."
        )


def overlap_k(labels: Iterable, k: int) -> int:
    """The k the recorded examples support: ``k``, or lower (with a warning; tables show it in column
    ``k``) when failures left a class with k or fewer examples; refused when no k >= 1 is left."""
    label, smallest, _ = _smallest_class(labels)
    if smallest < 2:
        raise DataError(
            f"Class {label!r} has {smallest} recorded example(s): the neighbourhood overlap needs 2 per class."
        )
    if k > smallest - 1:
        logger.warning(
            "failures left class %r with %d examples: neighbourhood overlap uses k=%d, not %d",
            label,
            smallest,
            smallest - 1,
            k,
        )
    return min(k, smallest - 1)
