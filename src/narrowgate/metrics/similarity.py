"""Similarity between output distributions, used to score activation patching (Eq. 3).

Both functions reduce over the last dimension and broadcast over the leading
ones, so a whole batch of next-token distributions is compared at once. They
accept numpy arrays or torch tensors and return the same kind (a torch tensor
if either input is one).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["distribution_similarity", "weighted_jaccard"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _pair(p, q):
    """Return (p, q, is_torch) with both inputs of one kind, torch if either is torch."""
    if isinstance(p, torch.Tensor) or isinstance(q, torch.Tensor):
        ref = p if isinstance(p, torch.Tensor) else q
        p = torch.as_tensor(p, device=ref.device)
        q = torch.as_tensor(q, device=ref.device)
        return p, q, True
    return np.asarray(p), np.asarray(q), False


def distribution_similarity(p: ArrayT, q: ArrayT) -> ArrayT:
    """Histogram intersection ``sum_v min(p_v, q_v)`` of two probability vectors.

    1 for identical distributions, 0 for disjoint supports; this is the
    patching similarity of the paper (Eq. 3).
    """
    p, q, is_torch = _pair(p, q)
    if is_torch:
        return torch.minimum(p, q).sum(dim=-1)
    return np.minimum(p, q).sum(axis=-1)


def weighted_jaccard(p: ArrayT, q: ArrayT) -> ArrayT:
    """Weighted (Ruzicka) Jaccard index ``sum_v min(p_v, q_v) / sum_v max(p_v, q_v)``.

    For non-negative vectors; where both are all zeros (identical) it is 1.
    """
    p, q, is_torch = _pair(p, q)
    if is_torch:
        num = torch.minimum(p, q).sum(dim=-1)
        den = torch.maximum(p, q).sum(dim=-1)
        ones = torch.ones_like(num, dtype=torch.result_type(num, 1.0))
        return torch.where(den > 0, num / torch.where(den > 0, den, ones), ones)
    num = np.minimum(p, q).sum(axis=-1)
    den = np.maximum(p, q).sum(axis=-1)
    safe = np.where(den > 0, den, 1.0)
    return np.where(den > 0, num / safe, 1.0)[()]
