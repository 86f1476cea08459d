"""Head ablation: chosen attention heads of one decoder layer silenced (zero) or replaced by their mean output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..engine.interventions import Hook
from ..engine.protocol import Intervention, InterventionError, ModelShape, Resolved, Where
from ..roles import parse_roles

if TYPE_CHECKING:
    from ..batch import Batch

__all__ = ["HeadKnockout"]

MODES = ("zero", "mean")


@dataclass(frozen=True, eq=False)
class HeadKnockout(Intervention):
    """Ablate attention ``heads`` of decoder layer ``layer`` at the positions of ``roles``, before the output projection.

    ``mode="zero"``: the heads' outputs are set to zero. ``mode="mean"``: each is replaced by its mean output, from
    ``means`` ([heads, D_head] for every head of the layer, e.g. over a reference set with a read-only `Hook` at
    ``head``) or, without it, its mean over the positions of ``roles`` that the model call computes, across the
    batch (in generation: the prompt's positions, then each step's new tokens). A `Hook` at ``head``.
    """

    layer: int
    heads: tuple[int, ...]  # or one head, an int
    roles: str | tuple = "text"
    mode: str = "zero"
    means: torch.Tensor | None = None

    def __post_init__(self) -> None:
        heads = (self.heads,) if isinstance(self.heads, int) else tuple(int(h) for h in self.heads)
        if not heads:
            raise ValueError("HeadKnockout needs at least one head (an empty set would do nothing).")
        object.__setattr__(self, "heads", heads)
        parse_roles(self.roles)
        if self.mode not in MODES:
            raise ValueError(f"HeadKnockout mode must be one of {MODES}, got {self.mode!r}.")
        if self.means is not None and (self.mode != "mean" or self.means.dim() != 2):
            raise ValueError("HeadKnockout means are for mode='mean': a [heads, D_head] tensor.")

    @property
    def name(self) -> str:
        """A readable name of this HeadKnockout, used in messages and in the record of what applied."""
        roles = "+".join(str(r) for r in parse_roles(self.roles))
        return f"HeadKnockout of heads {list(self.heads)} in decoder layer {self.layer} at {roles} ({self.mode})"

    def resolve(self, batch: Batch, model: ModelShape) -> Resolved:
        """A `Hook` at ``head`` ablating the chosen heads, once heads and means are checked against ``model``."""
        bad = [h for h in self.heads if not 0 <= h < model.heads]
        if bad:
            raise InterventionError(f"{self.name}: heads {bad} out of range; the layer has heads 0..{model.heads - 1}.")
        if self.means is not None and tuple(self.means.shape) != (model.heads, model.head_dim):
            raise InterventionError(
                f"{self.name}: means are {tuple(self.means.shape)}, the layer's heads [{model.heads}, {model.head_dim}]."
            )
        chosen = torch.zeros(model.heads, dtype=torch.bool)
        chosen[list(self.heads)] = True

        def ablate(value: torch.Tensor, where: Where) -> torch.Tensor:  # [B, R, heads, D_head]
            pick = chosen.to(value.device)[None, None, :, None]
            if self.mode == "zero":
                return value.masked_fill(pick, 0.0)
            if self.means is not None:
                mean = self.means.to(value.device, value.dtype)
            else:
                rows = where.valid.to(value.device, value.dtype)[..., None, None]
                mean = (value * rows).sum((0, 1)) / rows.sum()
            return torch.where(pick, mean[None, None], value)

        ablate.__name__ = f"head_knockout_{self.mode}"
        return Hook("head", self.layer, self.roles, ablate).resolve(batch, model)
