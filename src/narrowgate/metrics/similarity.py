"""Similarity between output distributions, used to score activation patching (Eq. 3).

Both functions reduce over the last dimension and broadcast over the leading
ones, so a whole batch of next-token distributions is compared at once. They
accept numpy arrays or torch tensors and return the same kind (a torch tensor
if either input is one).
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch

__all__ = ["distribution_similarity", "weighted_jaccard"]

Array = np.ndarray | torch.Tensor


def _tensors(p: Array, q: Array) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as torch tensors on the device of the one that is a tensor."""
    ref = p if isinstance(p, torch.Tensor) else q
    assert isinstance(ref, torch.Tensor)  # called only when one of them is
    return torch.as_tensor(p, device=ref.device), torch.as_tensor(q, device=ref.device)


@overload
def distribution_similarity(p: np.ndarray, q: np.ndarray) -> np.ndarray: ...
@overload
def distribution_similarity(p: torch.Tensor, q: Array) -> torch.Tensor: ...
@overload
def distribution_similarity(p: np.ndarray, q: torch.Tensor) -> torch.Tensor: ...
def distribution_similarity(p: Array, q: Array) -> Array:
    """Histogram intersection ``sum_v min(p_v, q_v)`` of two probability vectors.

    1 for identical distributions, 0 for disjoint supports; this is the
    patching similarity of the paper (Eq. 3).
    """
    if isinstance(p, torch.Tensor) or isinstance(q, torch.Tensor):
        tp, tq = _tensors(p, q)
        return torch.minimum(tp, tq).sum(dim=-1)
    return np.minimum(np.asarray(p), np.asarray(q)).sum(axis=-1)


@overload
def weighted_jaccard(p: np.ndarray, q: np.ndarray) -> np.ndarray: ...
@overload
def weighted_jaccard(p: torch.Tensor, q: Array) -> torch.Tensor: ...
@overload
def weighted_jaccard(p: np.ndarray, q: torch.Tensor) -> torch.Tensor: ...
def weighted_jaccard(p: Array, q: Array) -> Array:
    """Weighted (Ruzicka) Jaccard index ``sum_v min(p_v, q_v) / sum_v max(p_v, q_v)``.

    For non-negative vectors; where both are all zeros (identical) it is 1.
    """
    if isinstance(p, torch.Tensor) or isinstance(q, torch.Tensor):
        tp, tq = _tensors(p, q)
        num = torch.minimum(tp, tq).sum(dim=-1)
        den = torch.maximum(tp, tq).sum(dim=-1)
        ones = torch.ones_like(num, dtype=torch.result_type(num, 1.0))
        return torch.where(den > 0, num / torch.where(den > 0, den, ones), ones)
    np_p, np_q = np.asarray(p), np.asarray(q)
    num = np.minimum(np_p, np_q).sum(axis=-1)
    den = np.maximum(np_p, np_q).sum(axis=-1)
    safe = np.where(den > 0, den, 1.0)
    return np.where(den > 0, num / safe, 1.0)[()]
