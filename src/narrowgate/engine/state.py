"""The interventions of one model call: a frozen plan, what the call records, and its scratch state.

`resolve` binds interventions (the `Intervention` protocol) to a batch: a `Plan`. A `Run` pairs a plan
with the `Record` the call fills (captures, attention statistics, which interventions met their positions)
and `Scratch` state that lives for the call only. A run is made active (a context variable) for the
duration of a forward or a generation; the attention function and the layer hooks read it, and with no
active run they do nothing at all.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from ..batch import Batch
from .interventions import AttentionStats, Capture, Knockout, Patch, ResolvedCapture, ResolvedKnockout
from .protocol import (
    EDGES,
    SITES,
    Intervention,
    InterventionError,
    ModelShape,
    Resolved,
    RoleMask,
    resolve_all,
    role_mask,
)

__all__ = [
    "InterventionError",
    "Plan",
    "Record",
    "ResolvedKnockout",
    "RoleMask",
    "Run",
    "Scratch",
    "activate",
    "active_run",
    "recompute_context",
    "resolve",
    "role_mask",
]

if TYPE_CHECKING:
    from .budget import Budget

_ACTIVE: contextvars.ContextVar[Run | None] = contextvars.ContextVar("narrowgate_run", default=None)


def active_run() -> Run | None:
    """The run of the model call in progress in this context, or None outside one."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(run: Run) -> Iterator[Run]:
    """Make ``run`` the active run for the duration of the ``with`` block."""
    token = _ACTIVE.set(run)
    try:
        yield run
    finally:
        _ACTIVE.reset(token)


def recompute_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for `torch.utils.checkpoint`: the recompute in the backward pass sees the run of its forward.

    Gradient checkpointing re-runs a layer's forward during ``backward()``, possibly after the
    ``with`` block that activated the run has closed and, on GPUs, in autograd's own thread; without
    this the recomputed attention would silently drop the interventions.
    """
    run = active_run()
    return contextlib.nullcontext(), (activate(run) if run is not None else contextlib.nullcontext())


#: Sites the attention function serves (the others are layer hooks).
ATTENTION_SITES = (EDGES, "head", "pattern")


@dataclass(frozen=True)
class Plan:
    """What one model call does, resolved against its batch: fixed before the call, read by the hooks and the
    attention function, never written during it. Conditions stacked as batch rows are one plan (`shared.stack`).

    ``knockouts`` are the interventions at the attention mask (`EDGES`), read by every attention call;
    ``edits`` every other resolved intervention, in the order they apply at each site."""

    layer_of: dict[int, int]  # id(attention module) -> decoder layer index
    n_layers: int
    knockouts: tuple[ResolvedKnockout, ...] = ()
    edits: tuple[Resolved, ...] = ()
    prefix: list | None = None  # per decoder layer (keys, values) of a prefix shared by all rows (engine/shared.py)
    record_probs: bool = False  # keep each layer's suffix attention probabilities, gradients retained
    mixer_prefix: dict | None = None  # per recurrent layer, the shared prefix's projections (engine/recurrent.py)
    record_mixers: bool = False  # a prefix pass: keep each recurrent layer's projections for the suffix passes

    @cached_property
    def _sites(self) -> dict[tuple[str, int], tuple[Resolved, ...]]:
        out: dict[tuple[str, int], list[Resolved]] = {}
        for r in self.edits:
            for at in r.expected_layers(self.n_layers):
                out.setdefault((r.site, at), []).append(r)
        return {k: tuple(v) for k, v in out.items()}

    def at_site(self, site: str, at: int) -> tuple[Resolved, ...]:
        """The edits acting at ``site`` of residual index / decoder layer ``at``, in order."""
        return self._sites.get((site, at), ())

    @cached_property
    def sites(self) -> frozenset[str]:
        """Every site some edit acts at."""
        return frozenset(site for site, _ in self._sites)

    @cached_property
    def capture(self) -> ResolvedCapture | None:
        """The call's one capture, or None; two are refused (one capture lists every role)."""
        found = [r for r in self.edits if isinstance(r, ResolvedCapture)]
        if len(found) > 1:
            raise InterventionError("A call takes one Capture; list every role in it (Capture(roles=(...))).")
        return found[0] if found else None

    @property
    def capture_resids(self) -> tuple[int, ...]:
        """The residual indices the capture reads (none without a capture)."""
        return () if self.capture is None else self.capture.indices(self.n_layers)

    def active_key(self, layer: int) -> tuple[int, ...]:
        """Which knockouts apply at ``layer`` (their indices): layers with the same ones share masks."""
        return tuple(i for i, k in enumerate(self.knockouts) if k.layers is None or layer in k.layers)

    def knockouts_at(self, layer: int) -> list[ResolvedKnockout]:
        """The knockouts that apply at decoder layer ``layer``, in order."""
        return [self.knockouts[i] for i in self.active_key(layer)]

    @cached_property
    def _engine_layers(self) -> frozenset[int]:
        """Decoder layers whose attention the engine computes itself (knockouts, pattern edits)."""
        out: set[int] = set()
        for k in self.knockouts:
            out |= set(range(self.n_layers)) if k.layers is None else set(k.layers)
        for r in self.edits:
            if r.site == "pattern":
                out |= r.expected_layers(self.n_layers)
        return frozenset(out)

    def attention_active(self, layer: int) -> bool:
        """Whether the engine computes ``layer``'s attention (a plain call hands it to the stock function)."""
        return self.prefix is not None or layer in self._engine_layers

    def attention_layers(self) -> set[int]:
        """The decoder layers whose attention must run through the engine for the plan to apply."""
        out = set(self._engine_layers)
        for r in self.edits:
            if r.site == "head":
                out |= r.expected_layers(self.n_layers)
        return out

    def blocks(
        self, layer: int, offset: int, q_len: int, k_len: int, device: torch.device | str
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Boolean [B, Q, K] masks of knocked-out entries for mask-mode and zero-mode knockouts (or None)."""
        out: dict[str, torch.Tensor | None] = {"mask": None, "zero": None}
        for k in self.knockouts_at(layer):
            tq = k.target.window(offset, offset + q_len, device)
            sk = k.source.window(0, k_len, device)
            blk = tq[:, :, None] & sk[:, None, :]
            prev = out[k.mode]
            out[k.mode] = blk if prev is None else prev | blk
        return out["mask"], out["zero"]

    def first_affected(self) -> int | None:
        """The first position some intervention of the plan can change (None: it only reads)."""
        firsts = [f for r in (*self.knockouts, *self.edits) if (f := r.first_affected()) is not None]
        return min(firsts) if firsts else None


@dataclass
class Record:
    """What one call produced, written by the hooks and the attention function as layers run."""

    captured: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # sums, counts
    column_attention: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, K]
    visited: dict[int, set[int]] = field(default_factory=dict)  # id(resolved) -> where it met its positions
    attention_calls: set[int] = field(default_factory=set)  # layers whose attention ran through the engine
    probs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> probabilities (plan.record_probs)
    mixer_prefix: dict[int, dict] = field(default_factory=dict)  # recurrent layer -> projections (plan.record_mixers)


@dataclass
class Scratch:
    """State that means nothing once the call is over: the current layer call's window and what layers share."""

    offset: int = 0  # absolute position of the first query row in the current layer call (set by the pre-hook)
    masks: dict = field(default_factory=dict, repr=False)
    rows: dict = field(default_factory=dict, repr=False)  # per intervention and window: its rows there (sites.visit)
    buffers: dict = field(default_factory=dict, repr=False)  # tensors reused by every layer (attention scores)
    budget: Budget | None = None  # how large the attention's blocks of query rows may be (engine/budget.py)
    mixed: dict = field(default_factory=dict, repr=False)  # recurrent layer -> the cache its prompt pass left a view in

    def cached(self, key: tuple, make: Callable[[], Any], keep: object = None) -> Any:
        """What the layers of one call share (masks, where knockouts write): computed once per ``key``, reused.

        ``keep`` is held alongside so the id in ``key`` cannot be reused by another tensor.
        """
        hit = self.masks.get(key)
        if hit is None:
            if len(self.masks) > 8:
                self.masks.clear()
            hit = self.masks[key] = (make(), keep)
        return hit[0]

    def release(self) -> None:
        """Drop what the layers shared (masks, rows, buffers) once the call is over: a caller that keeps the `Run`
        for its record (a scan's suffix passes, one after the other) must not keep a pass's masks and score buffer
        alive through the next pass. All of it is remade on demand (a checkpointed layer recomputed later)."""
        self.masks.clear()
        self.rows.clear()
        self.buffers.clear()


@dataclass
class Run:
    """One model call in progress: its frozen `Plan`, the `Record` it fills and its `Scratch` state."""

    plan: Plan
    record: Record = field(default_factory=Record)
    scratch: Scratch = field(default_factory=Scratch)

    def record_probs(self, layer: int, probs: torch.Tensor) -> None:
        """Keep a layer's attention probabilities (and, under autograd, their gradient) when the plan asks."""
        if self.plan.record_probs:
            if probs.requires_grad:
                probs.retain_grad()
            self.record.probs[layer] = probs

    def check_applied(self) -> None:
        """Raise unless every intervention of the plan was applied during the call."""
        missed = sorted(self.plan.attention_layers() - self.record.attention_calls)
        if missed:
            raise InterventionError(
                f"The engine's attention never ran in decoder layers {missed}: the intervention did not apply. "
                "The model's attention implementation bypasses narrowgate."
            )
        for r in self.plan.edits:
            why = r.missing(self.record, self.plan.n_layers)
            if why:
                raise InterventionError(f"{why}: the intervention did not apply.")

    def residuals(self) -> dict[str, torch.Tensor]:
        """Captured residuals per role: [B, len(capture_resids), D], averaged over each role's positions."""
        capture = self.plan.capture
        return {} if capture is None else capture.residuals(self.record, self.plan.n_layers)


def resolve(
    batch: Batch,
    *,
    layer_of: dict[int, int],
    n_layers: int,
    knockouts: Iterable[Knockout] = (),
    patches: Iterable[Patch] = (),
    capture: Capture | None = None,
    attention_stats: bool = False,
    interventions: Iterable[Intervention] = (),
    model: ModelShape | None = None,
) -> Plan:
    """Bind interventions to ``batch`` (`Intervention.resolve`), checking that each one can apply.

    Order at each site: ``knockouts``, ``patches``, ``interventions``, then ``capture`` and ``attention_stats``
    (so a capture reads what the edits left)."""
    for k in knockouts:
        if not isinstance(k, Knockout):
            raise TypeError(f"knockouts must be narrowgate.Knockout objects, got {type(k).__name__}.")
    for p in patches:
        if not isinstance(p, Patch):
            raise TypeError(f"patches must be narrowgate.Patch objects, got {type(p).__name__}.")
    if capture is not None and not isinstance(capture, Capture):
        raise TypeError(f"capture must be a narrowgate.Capture, got {type(capture).__name__}.")
    every = [*knockouts, *patches, *interventions, *([capture] if capture is not None else [])]
    if attention_stats:
        every.append(AttentionStats())
    resolved = resolve_all(every, batch, model)
    for r in resolved:
        _check_at(r, n_layers)
    plan = Plan(
        layer_of,
        n_layers,
        tuple(r for r in resolved if r.site == EDGES),  # type: ignore[misc]
        tuple(r for r in resolved if r.site != EDGES),
    )
    plan.capture  # noqa: B018  # refuses a second capture now rather than mid-call
    return plan


def _check_at(r: Resolved, n_layers: int) -> None:
    """Refuse a site or layer the model does not have."""
    if r.site != EDGES and r.site not in SITES:
        raise InterventionError(f"{r.name}: unknown site {r.site!r}; sites are {', '.join(SITES)}.")
    if r.layers is None:
        return
    top, kind = (n_layers, "residual index") if r.site == "resid" else (n_layers - 1, "decoder layer")
    bad = sorted(x for x in r.layers if not 0 <= x <= top)
    if bad:
        raise InterventionError(f"{r.name}: {kind} {bad} out of range; valid ones are 0..{top}.")
