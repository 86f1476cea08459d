"""Mean-ablation of a role's residual: the residual stream at a role's positions replaced by its mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..engine.interventions import Hook
from ..engine.protocol import Intervention, InterventionError, ModelShape, Resolved, Where
from ..roles import parse_roles

if TYPE_CHECKING:
    from ..batch import Batch
    from ..vlm import VLM

__all__ = ["MeanAblation"]


@dataclass(frozen=True, eq=False)
class MeanAblation(Intervention):
    """Replace the residual stream entering decoder layer ``resid`` at every position of ``role`` with ``mean`` ([D]).

    `MeanAblation.fit` measures ``mean`` over reference batches (every position of the role in every example),
    so the role keeps the average of what it carries and loses what is specific to each input. A `Hook` at
    ``resid``.
    """

    role: str | tuple
    resid: int
    mean: torch.Tensor

    def __post_init__(self) -> None:
        parse_roles(self.role)
        if not isinstance(self.mean, torch.Tensor) or self.mean.dim() != 1:
            raise ValueError("MeanAblation mean must be a [hidden_size] tensor (see MeanAblation.fit).")

    @property
    def name(self) -> str:
        """A readable name of this MeanAblation, used in messages and in the record of what applied."""
        roles = "+".join(str(r) for r in parse_roles(self.role))
        return f"MeanAblation at {roles}, residual index {self.resid}"

    @classmethod
    def fit(
        cls, vlm: VLM, batches: Batch | list[Batch] | tuple[Batch, ...], role: str | tuple, resid: int
    ) -> MeanAblation:
        """The ablation with ``mean`` measured on ``batches`` (a `Batch` or several): the role's residual at ``resid``
        averaged over every position of the role in every example (a read-only `Hook`)."""
        batches = [batches] if not isinstance(batches, (list, tuple)) else list(batches)
        total, count = None, 0

        def read(value: torch.Tensor, where: Where) -> None:
            nonlocal total, count
            rows = value[where.valid].double().sum(0)
            total = rows if total is None else total + rows
            count += int(where.valid.sum())

        read.__name__ = "mean_of_role"
        for batch in batches:
            vlm.forward(batch, interventions=[Hook("resid", resid, role, read)])
        if total is None or count == 0:
            raise InterventionError(f"MeanAblation.fit: role {role!r} has no position in the batches given.")
        return cls(role, resid, (total / count).cpu())

    def resolve(self, batch: Batch, model: ModelShape) -> Resolved:
        """A `Hook` at ``resid`` writing the mean, once its size is checked against ``model``."""
        if self.mean.shape[0] != model.hidden_size:
            raise InterventionError(
                f"{self.name}: the mean has {self.mean.shape[0]} features, the residual stream {model.hidden_size}."
            )

        def ablate(value: torch.Tensor) -> torch.Tensor:  # [B, R, D]
            return self.mean.to(value.device, value.dtype).expand_as(value)

        ablate.__name__ = "mean_ablation"
        return Hook("resid", self.resid, self.role, ablate).resolve(batch, model)
