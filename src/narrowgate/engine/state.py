"""The interventions of one model call: a frozen plan, what the call records, and its scratch state.

`resolve` turns knockouts, patches and captures into position masks for a batch: a `Plan`. A `Run`
pairs a plan with the `Record` the call fills (captures, attention statistics, which interventions
applied) and `Scratch` state that lives for the call only. A run is made active (a context variable)
for the duration of a forward or a generation; the attention function and the layer hooks read it,
and with no active run they do nothing at all.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..batch import Batch
from ..errors import NarrowgateError
from ..roles import RoleError
from .interventions import Capture, Knockout, Patch

if TYPE_CHECKING:
    from .budget import Budget

_ACTIVE: contextvars.ContextVar[Run | None] = contextvars.ContextVar("narrowgate_run", default=None)


class InterventionError(NarrowgateError, RuntimeError):
    """A requested intervention cannot be applied; raised rather than silently doing nothing."""


def active_run() -> Run | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(run: Run):
    token = _ACTIVE.set(run)
    try:
        yield run
    finally:
        _ACTIVE.reset(token)


def recompute_context():
    """``context_fn`` for `torch.utils.checkpoint`: the recompute in the backward pass sees the run of its forward.

    Gradient checkpointing re-runs a layer's forward during ``backward()``, possibly after the
    ``with`` block that activated the run has closed and, on GPUs, in autograd's own thread; without
    this the recomputed attention would silently drop the interventions.
    """
    run = active_run()
    return contextlib.nullcontext(), (activate(run) if run is not None else contextlib.nullcontext())


@dataclass
class RoleMask:
    """A [B, T] prompt mask plus whether positions generated after the prompt belong to it."""

    prompt: torch.Tensor
    generated: bool

    def window(self, start: int, stop: int, device) -> torch.Tensor:
        """Mask over absolute positions [start, stop) ([B, stop-start]); beyond the prompt use ``generated``."""
        T = self.prompt.shape[1]
        inside = self.prompt[:, max(0, min(start, T)) : max(0, min(stop, T))]
        extra = max(0, stop - max(start, T))
        if extra:
            fill = torch.full((inside.shape[0], extra), self.generated, dtype=torch.bool)
            inside = torch.cat([inside, fill], dim=1)
        return inside.to(device)


def role_mask(batch: Batch, roles) -> RoleMask:
    from ..roles import parse_roles

    parsed = parse_roles(roles)
    return RoleMask(batch.mask(parsed), generated=any(r.name == "text" for r in parsed))


@dataclass
class ResolvedKnockout:
    source: RoleMask
    target: RoleMask
    layers: frozenset[int] | None
    mode: str


@dataclass(frozen=True)
class Plan:
    """What one model call does, resolved against its batch: fixed before the call, read by the hooks and the
    attention function, never written during it. Conditions stacked as batch rows are one plan (`shared.stack`)."""

    layer_of: dict[int, int]  # id(attention module) -> decoder layer index
    n_layers: int
    knockouts: tuple[ResolvedKnockout, ...] = ()
    patches: tuple[tuple[int, torch.Tensor, torch.Tensor], ...] = ()  # (resid, pos [B], value [B, D])
    capture_positions: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    capture_resids: tuple[int, ...] = ()
    text: RoleMask | None = None  # query rows for attention statistics
    prefix: list | None = None  # per decoder layer (keys, values) of a prefix shared by all rows (engine/shared.py)
    record_probs: bool = False  # keep each layer's suffix attention probabilities, gradients retained

    def active_key(self, layer: int) -> tuple[int, ...]:
        """Which knockouts apply at ``layer`` (their indices): layers with the same ones share masks."""
        return tuple(i for i, k in enumerate(self.knockouts) if k.layers is None or layer in k.layers)

    def knockouts_at(self, layer: int) -> list[ResolvedKnockout]:
        return [self.knockouts[i] for i in self.active_key(layer)]

    def attention_active(self, layer: int) -> bool:
        return bool(self.knockouts_at(layer)) or self.text is not None or self.prefix is not None

    def attention_layers(self) -> set[int]:
        """The decoder layers whose attention must run through the engine for the plan to apply."""
        if self.text is not None or any(k.layers is None for k in self.knockouts):
            return set(range(self.n_layers))
        return {l for k in self.knockouts for l in k.layers or ()}

    def blocks(self, layer: int, offset: int, q_len: int, k_len: int, device):
        """Boolean [B, Q, K] masks of knocked-out entries for mask-mode and zero-mode knockouts (or None)."""
        out: dict[str, torch.Tensor | None] = {"mask": None, "zero": None}
        for k in self.knockouts_at(layer):
            tq = k.target.window(offset, offset + q_len, device)
            sk = k.source.window(0, k_len, device)
            blk = tq[:, :, None] & sk[:, None, :]
            prev = out[k.mode]
            out[k.mode] = blk if prev is None else prev | blk
        return out["mask"], out["zero"]


@dataclass
class Record:
    """What one call produced, written by the hooks and the attention function as layers run."""

    captured: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # sums, counts
    column_attention: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, K]
    patched: set[int] = field(default_factory=set)  # indices into the plan's patches that were applied
    attention_calls: set[int] = field(default_factory=set)  # layers whose attention ran through the engine
    probs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> probabilities (plan.record_probs)


@dataclass
class Scratch:
    """State that means nothing once the call is over: the current layer call's window and what layers share."""

    offset: int = 0  # absolute position of the first query row in the current layer call (set by the pre-hook)
    masks: dict = field(default_factory=dict, repr=False)
    buffers: dict = field(default_factory=dict, repr=False)  # tensors reused by every layer (attention scores)
    budget: Budget | None = None  # how large the attention's blocks of query rows may be (engine/budget.py)

    def cached(self, key, make, keep=None):
        """What the layers of one call share (masks, where knockouts write): computed once per ``key``, reused.

        ``keep`` is held alongside so the id in ``key`` cannot be reused by another tensor.
        """
        hit = self.masks.get(key)
        if hit is None:
            if len(self.masks) > 8:
                self.masks.clear()
            hit = self.masks[key] = (make(), keep)
        return hit[0]


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
        """Raise unless every knockout, statistic and patch of the plan was applied during the call."""
        missed = sorted(self.plan.attention_layers() - self.record.attention_calls)
        if missed:
            raise InterventionError(
                f"The engine's attention never ran in decoder layers {missed}: the intervention did not apply. "
                "The model's attention implementation bypasses narrowgate."
            )
        unapplied = [i for i in range(len(self.plan.patches)) if i not in self.record.patched]
        if unapplied:
            raise InterventionError(f"Patches {unapplied} were never applied during the forward pass.")

    def residuals(self) -> dict[str, torch.Tensor]:
        """Captured residuals per role: [B, len(capture_resids), D], averaged over each role's positions."""
        out = {}
        for name, positions in self.plan.capture_positions.items():
            per_layer = self.record.captured.get(name, {})
            missing = [l for l in self.plan.capture_resids if l not in per_layer]
            if missing:
                raise InterventionError(f"Capture of {name} never reached residual indices {missing}.")
            sums = torch.stack([per_layer[l][0] for l in self.plan.capture_resids], dim=1)
            counts = torch.stack([per_layer[l][1] for l in self.plan.capture_resids], dim=1)
            want = torch.tensor([len(p) for p in positions], dtype=torch.float32)
            if not torch.equal(counts, want[:, None].expand_as(counts)):
                raise InterventionError(f"Capture of {name} saw only part of its positions.")
            out[name] = sums / counts[..., None]
        return out


def resolve(
    batch: Batch,
    *,
    layer_of: dict[int, int],
    n_layers: int,
    knockouts=(),
    patches=(),
    capture: Capture | None = None,
    attention_stats: bool = False,
) -> Plan:
    """Turn interventions into position masks for ``batch``, checking that each one can apply."""
    knocks: list[ResolvedKnockout] = []
    patched: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    positions: dict[str, list[torch.Tensor]] = {}
    resids: tuple[int, ...] = ()
    text: RoleMask | None = None
    for k in knockouts:
        if not isinstance(k, Knockout):
            raise TypeError(f"knockouts must be narrowgate.Knockout objects, got {type(k).__name__}.")
        if k.layers is not None:
            _check_layers(k.layers, n_layers - 1, f"Knockout {k.name}", "decoder layer")
        try:
            src, tgt = role_mask(batch, k.sources), role_mask(batch, k.targets)
        except RoleError as e:
            raise InterventionError(f"Knockout {k.name} cannot apply: {e}") from e
        knocks.append(ResolvedKnockout(src, tgt, None if k.layers is None else frozenset(k.layers), k.mode))
    for p in patches:
        if not isinstance(p, Patch):
            raise TypeError(f"patches must be narrowgate.Patch objects, got {type(p).__name__}.")
        _check_layers((p.resid,), n_layers, f"Patch at {p.role}", "residual index")
        try:
            pos = batch.index(p.role)
        except RoleError as e:
            raise InterventionError(f"Patch at {p.role} cannot apply: {e}") from e
        if p.value.shape[0] != batch.size:
            raise InterventionError(f"Patch value has batch size {p.value.shape[0]}, the batch has {batch.size}.")
        patched.append((p.resid, pos, p.value))
    if capture is not None:
        layers = tuple(range(n_layers + 1)) if capture.resids is None else capture.resids
        _check_layers(layers, n_layers, "Capture", "residual index")
        resids = tuple(layers)
        for r in capture.parsed:
            role_pos = batch.positions(r)
            empty = [b for b, p in enumerate(role_pos) if len(p) == 0]
            if empty:
                raise InterventionError(f"Cannot capture role {r}: it is empty in example(s) {empty}.")
            positions[str(r)] = role_pos
        for name, at in capture.at or ():  # type: ignore[union-attr]  # a tuple after Capture.__post_init__
            if len(at) != batch.size or not all(0 <= p < batch.length for p in at):
                raise InterventionError(
                    f"Capture {name!r} needs one position per example inside the sequence (0..{batch.length - 1})."
                )
            positions[name] = [torch.tensor([p]) for p in at]
    if attention_stats:
        try:
            text = role_mask(batch, "text")
        except RoleError as e:
            raise InterventionError(f"Cross-modal attention needs text positions: {e}") from e
    return Plan(layer_of, n_layers, tuple(knocks), tuple(patched), positions, resids, text)


def _check_layers(layers, top: int, what: str, kind: str) -> None:
    bad = [x for x in layers if not 0 <= x <= top]
    if bad:
        raise InterventionError(f"{what}: {kind} {bad} out of range; valid {kind}es are 0..{top}.")
