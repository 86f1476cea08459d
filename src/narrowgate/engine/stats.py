"""Relative cross-modal attention (the paper's Eq. 1), assembled from per-layer column sums.

For layer l and pre-text position j (every image's span and ``eoi``; ``bos``, ``boi`` and ``between`` excluded)::

    c_l(j) = sum_h mean_{i in text} A^{l,h}_{i,j},    f_l(j) = c_l(j) / sum_j' c_l(j')

The attention function accumulates ``sum_h mean_i A_ij`` over all key columns from the text
query rows only; this module picks the pre-text columns and normalises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import Batch
from ..roles import Role, image_side, parse_role


@dataclass
class CrossModalAttention:
    """``fractions[b, l, p]``: share of text->image attention that position ``positions[b, p]`` gets at layer l;
    ``mass[b, l, p]`` the same before normalising, c_l(j).

    Rows are NaN-padded where examples have fewer pre-text positions; ``labels[b][p]`` names each
    position by its single-position role (``image[k]``, ``eol[i]``, ``image_special[i]``, ``eoi``).
    """

    fractions: torch.Tensor  # [B, L, P]
    mass: torch.Tensor  # [B, L, P]: c_l(j) before normalising (the authors average this, then normalise)
    positions: torch.Tensor  # [B, P], -1 = padding
    labels: list[list[str]]
    batch: Batch

    def share(self, role: str | Role) -> torch.Tensor:
        """[B, L]: total fraction received by the positions of ``role`` (e.g. 'eoi', 'eol', 'internal_image')."""
        r = parse_role(role)
        role_pos = self.batch.positions(r)
        out = torch.zeros(self.fractions.shape[:2])
        for b, pos in enumerate(role_pos):
            hit = torch.isin(self.positions[b], pos) & (self.positions[b] >= 0)
            out[b] = self.fractions[b][:, hit].sum(-1)
        return out


def build(batch: Batch, column_attention: dict[int, torch.Tensor], n_layers: int) -> CrossModalAttention:
    """The statistics of ``batch`` from each layer's column attention (`interventions.column_attention`)."""
    missing = [l for l in range(n_layers) if l not in column_attention]
    if missing:
        raise RuntimeError(f"Cross-modal attention was not computed in layers {missing}.")
    cols = torch.stack([column_attention[l].float().cpu() for l in range(n_layers)], dim=1)  # [B, L, T]
    per_pos, per_lab = [], []
    for b in range(batch.size):
        visuals = batch.visuals(b)
        side = [s for n, lay in enumerate(visuals, 1) for s in image_side(lay, n if len(visuals) > 1 else None)]
        per_pos.append([p for p, _, _ in side])
        per_lab.append([name for _, name, _ in side])
    P = max(len(p) for p in per_pos)
    B, L = cols.shape[:2]
    fractions = torch.full((B, L, P), float("nan"))
    mass = torch.full((B, L, P), float("nan"))
    positions = torch.full((B, P), -1, dtype=torch.long)
    for b, pos in enumerate(per_pos):
        idx = torch.tensor(pos, dtype=torch.long)
        c = cols[b][:, idx]
        fractions[b, :, : len(pos)] = c / c.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        mass[b, :, : len(pos)] = c
        positions[b, : len(pos)] = idx
    return CrossModalAttention(fractions=fractions, mass=mass, positions=positions, labels=per_lab, batch=batch)
