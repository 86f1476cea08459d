"""Steering-vector addition: ``scale * vector`` added to the residual stream at a role's positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..engine.interventions import Hook
from ..engine.protocol import Intervention, InterventionError, ModelShape, Resolved
from ..roles import parse_roles

if TYPE_CHECKING:
    from ..batch import Batch

__all__ = ["AddVector"]


@dataclass(frozen=True, eq=False)
class AddVector(Intervention):
    """Add ``scale * vector`` to the residual stream entering decoder layer ``resid`` at every position of ``role``.

    ``vector`` is ``[D]`` (the same for every example) or ``[B, D]`` (one per example). With ``role="text"``
    every generated token is steered too. A `Hook` at ``resid``, so exact wherever a hook is.
    """

    role: str | tuple
    resid: int
    vector: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        parse_roles(self.role)
        if not isinstance(self.vector, torch.Tensor) or self.vector.dim() not in (1, 2):
            raise ValueError("AddVector vector must be a [hidden_size] or [batch, hidden_size] tensor.")

    @property
    def name(self) -> str:
        """A readable name of this AddVector, used in messages and in the record of what applied."""
        roles = "+".join(str(r) for r in parse_roles(self.role))
        return f"AddVector at {roles}, residual index {self.resid}, scale {self.scale:g}"

    def resolve(self, batch: Batch, model: ModelShape) -> Resolved:
        """A `Hook` at ``resid`` adding the scaled vector, once its size is checked against ``batch`` and ``model``."""
        if self.vector.shape[-1] != model.hidden_size:
            raise InterventionError(
                f"{self.name}: the vector has {self.vector.shape[-1]} features, the residual stream {model.hidden_size}."
            )
        if self.vector.dim() == 2 and self.vector.shape[0] != batch.size:
            raise InterventionError(f"{self.name}: {self.vector.shape[0]} vectors for a batch of {batch.size}.")
        vector = self.vector[None] if self.vector.dim() == 1 else self.vector

        def add(value: torch.Tensor) -> torch.Tensor:  # [B, R, D]
            return value + self.scale * vector[:, None].to(value.device, value.dtype)

        add.__name__ = "add_vector"
        return Hook("resid", self.resid, self.role, add).resolve(batch, model)
