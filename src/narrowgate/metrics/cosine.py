"""Modality gap: cosine similarity between image and text representations (Sec. 4.1).

Row i of the image and text matrices comes from the same example i. The
statistic is taken over pairs (image i, text j) with i != j, so that it
measures how the two modalities are arranged in general rather than how well
one example's image matches its own text. All N(N-1) ordered pairs are used
while that number is at most ``max_pairs`` (computed in blocks of rows);
beyond it ``max_pairs`` pairs are drawn uniformly with a fixed seed. Zero
vectors count as orthogonal to everything.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = ["cosine_gap", "cosine_gap_per_layer"]

DEFAULT_MAX_PAIRS = 4_000_000
# Gathered rows per chunk when sampling pairs: about this many elements per side.
_CHUNK_ELEMENTS = 2**24


def _unit_rows(X) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero), float64 kept, else float32."""
    t = torch.as_tensor(X).detach()
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    return torch.nn.functional.normalize(t, dim=-1)


def _all_offdiagonal(img: torch.Tensor, txt: torch.Tensor, block_size: int) -> np.ndarray:
    """Cosines of all ordered pairs i != j, streamed by blocks of image rows."""
    n = img.shape[0]
    parts = []
    for start in range(0, n, block_size):
        stop = min(n, start + block_size)
        block = img[start:stop] @ txt.T
        keep = torch.ones_like(block, dtype=torch.bool)
        rows = torch.arange(stop - start, device=block.device)
        keep[rows, rows + start] = False
        parts.append(block[keep].to(torch.float64).cpu().numpy())
    return np.concatenate(parts)


def _sampled_pairs(img: torch.Tensor, txt: torch.Tensor, n_pairs: int, seed: int) -> np.ndarray:
    """Cosines of ``n_pairs`` ordered pairs i != j drawn uniformly (with replacement)."""
    n, d = img.shape
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=n_pairs)
    j = rng.integers(0, n - 1, size=n_pairs)
    j = j + (j >= i)
    chunk = max(1, _CHUNK_ELEMENTS // max(d, 1))
    out = np.empty(n_pairs, dtype=np.float64)
    for start in range(0, n_pairs, chunk):
        stop = min(n_pairs, start + chunk)
        ii = torch.as_tensor(i[start:stop], device=img.device)
        jj = torch.as_tensor(j[start:stop], device=img.device)
        out[start:stop] = (img[ii] * txt[jj]).sum(dim=1).to(torch.float64).cpu().numpy()
    return out


@torch.no_grad()
def cosine_gap(
    image_vectors,
    text_vectors,
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    block_size: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Median and quartiles of image-text cosine similarities over pairs of different examples.

    ``image_vectors`` and ``text_vectors`` are [N, D] (numpy or torch, CPU or
    CUDA), aligned by row. Returns ``{"median", "q25", "q75", "iqr", "n_pairs"}``
    with quantiles as ``numpy.quantile`` computes them (linear interpolation).
    Exact over all N(N-1) pairs when that is at most ``max_pairs``; otherwise
    estimated on ``max_pairs`` pairs sampled with ``seed``. ``block_size`` is
    the number of image rows scored at a time in the exact case.
    """
    img, txt = _unit_rows(image_vectors), _unit_rows(text_vectors)
    if img.ndim != 2 or txt.ndim != 2:
        raise ValueError("image_vectors and text_vectors must be [N, D]")
    if img.shape != txt.shape:
        raise ValueError(f"image and text shapes differ: {tuple(img.shape)} vs {tuple(txt.shape)}")
    if img.device != txt.device:
        raise ValueError(f"image and text live on different devices: {img.device} vs {txt.device}")
    n = img.shape[0]
    if n < 2:
        raise ValueError("cosine_gap needs at least 2 examples to form pairs of different examples")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be positive, got {max_pairs}")
    txt = txt.to(img.dtype)
    total = n * (n - 1)
    if total <= max_pairs:
        if block_size is None:
            block_size = max(1, min(n, _CHUNK_ELEMENTS // n))
        values = _all_offdiagonal(img, txt, block_size)
    else:
        values = _sampled_pairs(img, txt, int(max_pairs), seed)
    q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return {
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "iqr": float(q75 - q25),
        "n_pairs": int(values.size),
    }


def cosine_gap_per_layer(
    image_vectors,
    text_vectors,
    *,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    block_size: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """:func:`cosine_gap` of each layer of [L, N, D] inputs, one row per layer.

    Returns a DataFrame with columns ``layer, median, q25, q75, iqr, n_pairs``.
    Every layer uses the same seed, hence the same sampled pairs when sampling.
    """
    if image_vectors.ndim != 3 or text_vectors.ndim != 3:
        raise ValueError("image_vectors and text_vectors must be [n_layers, N, D]")
    if tuple(image_vectors.shape) != tuple(text_vectors.shape):
        raise ValueError(f"image and text shapes differ: {tuple(image_vectors.shape)} vs {tuple(text_vectors.shape)}")
    rows = []
    for layer in range(image_vectors.shape[0]):
        stats = cosine_gap(
            image_vectors[layer], text_vectors[layer], max_pairs=max_pairs, block_size=block_size, seed=seed
        )
        rows.append({"layer": layer, **stats})
    return pd.DataFrame(rows, columns=["layer", "median", "q25", "q75", "iqr", "n_pairs"])
