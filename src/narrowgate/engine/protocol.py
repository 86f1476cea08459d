"""The intervention protocol: what the engine asks of anything it applies during a model call.

An `Intervention` is a value object (a knockout, a patch, a capture, a user's `Hook`) with one method,
`Intervention.resolve`, which binds it to a batch. It returns one or more `Resolved` objects, fixed before the
model runs, each of which says

- **where it acts**: a ``site`` (`SITES`, or the engine's own `EDGES`) and the residual indices or decoder
  layers there (``layers``);
- **at which positions**: ``rows``, a `RoleMask` (prompt positions by role; whether generated tokens count);
- **its first affected position** (`Resolved.first_affected`): positions before it compute the same in every
  condition, so a prefix shared by several conditions stays exact;
- **how it stacks** (`Resolved.stack`): several conditions run as batch rows of one pass, condition-major;
  by default each condition's part sees only its own rows, so anything a part does alone it does stacked;
- **what it does** at its site (`Resolved.visit`: read the value at its rows, or return a replacement);
- **how it proves it was applied** (`Resolved.missing`): after every call the engine asks; an intervention
  that never met its rows raises `InterventionError` instead of silently doing nothing.

Most interventions need nothing beyond `Hook` (a function at a named site, restricted to role positions):
their ``resolve`` returns ``Hook(...).resolve(batch)``. docs/contributing/intervention.md walks through writing one.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import NarrowgateError
from ..roles import RoleError, parse_roles

if TYPE_CHECKING:
    from ..batch import Batch
    from ..roles import Role
    from .state import Record

#: The named sites a `Hook` (or any `Resolved`) can act at, and the value it sees there. ``R`` counts the
#: positions at the hook's roles that one model call computes, in ascending order; an example with fewer has
#: its last rows zero-padded (`Where.valid` says which), and what is returned there is ignored.
SITES = {
    "resid": "residual stream entering decoder layer `at` (0 = embeddings, n_layers = the last layer's output, "
    "before the final norm): [B, R, D]",
    "attn_out": "output of decoder layer `at`'s attention module, before it is added to the residual: [B, R, D]",
    "mlp_out": "output of decoder layer `at`'s MLP, before it is added to the residual: [B, R, D]",
    "head": "per-head attention output of decoder layer `at`, before the output projection: [B, R, heads, D_head]",
    "pattern": "attention probabilities of decoder layer `at` for the query rows at the roles: [B, heads, R, keys]",
}
"""The named sites a `Hook` (or any `Resolved`) can act at, and the shape of the value it sees there."""
#: The engine's own site: entries of the attention mask (`Knockout`), applied inside the attention function.
EDGES = "edges"
#: Axis of the value that runs over the positions, per site.
ROW_AXIS = {"resid": 1, "attn_out": 1, "mlp_out": 1, "head": 1, "pattern": 2}


class InterventionError(NarrowgateError, RuntimeError):
    """A requested intervention cannot be applied; raised rather than silently doing nothing."""


@dataclass
class RoleMask:
    """A [B, T] prompt mask plus whether positions generated after the prompt belong to it (a bool, or one
    bool per row when conditions with different roles are stacked)."""

    prompt: torch.Tensor
    generated: bool | torch.Tensor

    def window(self, start: int, stop: int, device: torch.device | str) -> torch.Tensor:
        """Mask over absolute positions [start, stop) ([B, stop-start]); beyond the prompt use ``generated``."""
        B, T = self.prompt.shape
        inside = self.prompt[:, max(0, min(start, T)) : max(0, min(stop, T))]
        extra = max(0, stop - max(start, T))
        if extra:
            fill = torch.as_tensor(self.generated, dtype=torch.bool).reshape(-1, 1).expand(B, extra)
            inside = torch.cat([inside, fill], dim=1)
        return inside.to(device)

    def at(self, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Membership of absolute ``positions`` ([B, R]; only where ``valid``) in the mask ([B, R] bool)."""
        B, T = self.prompt.shape
        prompt = self.prompt.to(positions.device)
        inside = torch.gather(prompt, 1, positions.clamp(0, T - 1))
        gen = torch.as_tensor(self.generated, dtype=torch.bool, device=positions.device).reshape(-1, 1)
        return torch.where(positions >= T, gen.expand(B, positions.shape[1]), inside) & valid

    def first(self) -> int | None:
        """The first position (over the batch) in the mask; None when it is empty and generated tokens do not count."""
        cols = self.prompt.any(0).nonzero()
        if len(cols):
            return int(cols.min())
        return self.prompt.shape[1] if bool(torch.as_tensor(self.generated).any()) else None


def role_mask(batch: Batch, roles: str | Role | tuple | list) -> RoleMask:
    """The positions of ``roles`` in ``batch``; ``text`` also covers generated tokens. Raises `RoleError` when
    the roles name no position in any example."""
    parsed = parse_roles(roles)
    return RoleMask(batch.mask(parsed), generated=any(r.name == "text" for r in parsed))


@dataclass(frozen=True)
class ModelShape:
    """What an intervention may need to know about the model: sizes, for checks and for values it builds."""

    n_layers: int
    hidden_size: int
    heads: int
    head_dim: int


@dataclass(frozen=True)
class Where:
    """Where a visit happens: the site, the residual index or decoder layer ``at``, and which positions the
    value's rows are (``positions`` [B, R], absolute, counting generated tokens on from the prompt; -1 on
    padding rows, where ``valid`` is False: an example with fewer positions at the roles in this call)."""

    site: str
    at: int
    positions: torch.Tensor
    valid: torch.Tensor


class Resolved(abc.ABC):
    """An intervention bound to one batch: fixed before the call, read by the engine during it.

    Subclasses set ``site``, ``layers`` (residual indices for ``resid``, decoder layers otherwise; None = every
    one), ``rows`` and ``name``, and implement `visit` (the `EDGES` site has no visit: its masks are read by
    the attention function).
    """

    site: str
    layers: frozenset[int] | None
    rows: RoleMask
    name: str

    def first_affected(self) -> int | None:
        """The first position whose computation this can change: a prefix shared by several conditions must end
        at or before it. None: it only reads, wherever its rows are, and what it reads in a shared prefix is
        read once for every condition (captures)."""
        return self.rows.first()

    def visit(self, value: torch.Tensor, where: Where, record: Record) -> torch.Tensor | None:
        """Read ``value`` (this site's tensor at this intervention's rows, `SITES`) and return a replacement of
        the same shape, or None to leave it. ``record`` is the call's `Record` (for built-in readers)."""
        raise NotImplementedError(f"{type(self).__name__} does not visit tensor sites.")

    def stack_key(self) -> tuple:
        """Resolved objects of different conditions with equal keys stack into one (`stack`)."""
        return (Stacked, self.site, self.layers)

    @classmethod
    def stack(cls, parts: list[Resolved | None], batch_size: int, length: int) -> Resolved:
        """One resolved object over ``len(parts) * batch_size`` rows (condition-major) acting as each part does on
        its own condition's rows (None: the condition lacks it). Default: `Stacked`, which visits each part with
        its own rows only."""
        return Stacked(parts, batch_size, length)

    def expected_layers(self, n_layers: int) -> set[int]:
        """The residual indices or decoder layers at which it must act."""
        if self.layers is not None:
            return set(self.layers)
        return set(range(n_layers + 1 if self.site == "resid" else n_layers))

    def missing(self, record: Record, n_layers: int) -> str | None:
        """Why it was not applied during the call, or None. Default: it must have met at least one of its rows
        at every one of its layers."""
        seen = record.visited.get(id(self), set())
        lacking = sorted(self.expected_layers(n_layers) - seen)
        if lacking:
            kind = "residual indices" if self.site == "resid" else "decoder layers"
            return f"{self.name} never met its positions at {kind} {lacking} (site {self.site!r})"
        return None


class Stacked(Resolved):
    """The same kind of intervention from several conditions in one pass (conditions as batch rows, condition-major):
    each condition's part visits its own rows only, so a visit that mixes an example's rows or the batch's examples
    (a mean, a statistic) stays what it is alone."""

    def __init__(self, parts: list[Resolved | None], batch_size: int, length: int) -> None:
        present = [p for p in parts if p is not None]
        first = present[0]
        self.parts, self.batch_size = parts, batch_size
        self.site, self.layers = first.site, first.layers
        self.name = " / ".join(dict.fromkeys(p.name for p in present))
        empty = torch.zeros(batch_size, length, dtype=torch.bool)
        self.rows = RoleMask(
            torch.cat([empty if p is None else p.rows.prompt for p in parts]),
            torch.cat(
                [
                    torch.as_tensor(False if p is None else p.rows.generated, dtype=torch.bool).expand(batch_size)
                    for p in parts
                ]
            ),
        )

    def first_affected(self) -> int | None:
        """The earliest of its parts' first affected positions."""
        firsts = [f for p in self.parts if p is not None and (f := p.first_affected()) is not None]
        return min(firsts) if firsts else None

    def expected_layers(self, n_layers: int) -> set[int]:
        """Every layer at which any of its parts must act."""
        return set().union(*(p.expected_layers(n_layers) for p in self.parts if p is not None))

    def visit(self, value: torch.Tensor, where: Where, record: Record) -> torch.Tensor | None:
        """Visit each part with its own condition's rows (cut to the positions valid there) and write back what
        it replaces; None when no part replaced anything."""
        B, axis = self.batch_size, ROW_AXIS[where.site]
        out = None
        for c, part in enumerate(self.parts):
            if part is None:
                continue
            rows = slice(c * B, (c + 1) * B)
            valid = where.valid[rows]
            n = int(valid.sum(1).max())
            if n == 0:
                continue
            record.visited.setdefault(id(part), set()).add(where.at)
            sub = value[rows].narrow(axis, 0, n)
            new = part.visit(sub, Where(where.site, where.at, where.positions[rows, :n], valid[:, :n]), record)
            if new is None:
                continue
            check_value(part, new, sub, where.site)
            if out is None:
                out = value.clone()
            index: list = [slice(None)] * value.dim()
            index[0], index[axis] = rows, slice(0, n)
            out[tuple(index)] = new
        return out

    def missing(self, record: Record, n_layers: int) -> str | None:
        """The first part's reason for not having been applied, or None."""
        for p in self.parts:
            if p is not None and (why := p.missing(record, n_layers)):
                return why
        return None


def check_value(r: Resolved, new: object, value: torch.Tensor, site: str) -> None:
    """Refuse a replacement not shaped like the value it replaces, naming the intervention."""
    if not isinstance(new, torch.Tensor) or new.shape != value.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise InterventionError(
            f"{r.name} returned {got} at site {site!r}; return a tensor shaped like the value it was given "
            f"({tuple(value.shape)}), or None to leave it."
        )


class Intervention(abc.ABC):
    """Anything narrowgate applies during a model call: `Knockout`, `Patch`, `Capture`, `AttentionStats`, `Hook`,
    and interventions written outside the engine (``narrowgate.interventions``).

    Implement `resolve`. Pass instances to `VLM.forward`, `VLM.generate`, `VLM.intervening`, or a
    `Condition` of `VLM.forward_conditions` / `VLM.generate_conditions`, as ``interventions=[...]``.
    """

    @abc.abstractmethod
    def resolve(self, batch: Batch, model: ModelShape) -> Resolved | list[Resolved] | tuple[Resolved, ...]:
        """Bind to ``batch``: positions by role, values checked against the batch and ``model``. Raise
        `InterventionError` (or `RoleError`) when it cannot apply, e.g. its roles name no position."""


def resolve_all(interventions: Iterable[Intervention], batch: Batch, model: ModelShape | None) -> list[Resolved]:
    """Every intervention resolved against ``batch``, in order; a role error becomes an `InterventionError`.

    ``model`` is None only where positions alone are asked of built-in interventions (`shared.first_affected`
    of a `Condition`); they check the model's sizes when it is given."""
    out: list[Resolved] = []
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(
                f"interventions must be narrowgate.Intervention objects (Knockout, Patch, Hook...), got "
                f"{type(iv).__name__}."
            )
        try:
            got = iv.resolve(batch, model)  # type: ignore[arg-type]  # None: see the docstring
        except RoleError as e:
            raise InterventionError(f"{_name(iv)} cannot apply: {e}") from e
        if isinstance(got, Resolved):
            got = [got]
        if not all(isinstance(r, Resolved) for r in got):
            raise TypeError(f"{_name(iv)}.resolve must return Resolved objects (e.g. Hook(...).resolve(batch, model)).")
        out += list(got)
    return out


def _name(iv: Any) -> str:
    name = getattr(iv, "name", None)
    if not isinstance(name, str):
        return type(iv).__name__
    return name if name.startswith(type(iv).__name__) else f"{type(iv).__name__} {name}"
