"""The interventions the engine ships, as plain value objects implementing the `Intervention` protocol.

- `Knockout`: queries at ``target`` roles cannot attend to keys at ``source`` roles (site `EDGES`).
- `Patch`: overwrite the residual stream at one role's position entering a decoder layer (site ``resid``).
- `Capture`: read the residual stream at roles, every (or some) layer (site ``resid``, read only).
- `AttentionStats`: the cross-modal attention statistics, read from the text rows' probabilities (``pattern``).
- `Hook`: the user's own function at a named site, restricted to role positions.

Residual index ``l`` is the input of decoder layer ``l`` (0 = embeddings); index ``n_layers`` is
the last layer's output, before the final norm — the same indexing as HF ``hidden_states``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from ..deprecation import renamed
from ..parsing import parse_layer_set
from ..roles import Role, parse_role, parse_roles
from .protocol import EDGES, SITES, Intervention, InterventionError, ModelShape, Resolved, RoleMask, Where, role_mask

if TYPE_CHECKING:
    from ..batch import Batch
    from .state import Record

KNOCKOUT_MODES = ("zero", "mask")
_R = TypeVar("_R", bound=Resolved)


def _layers(layers: int | Iterable[int] | None) -> tuple[int, ...] | None:
    """None (every layer) or a non-empty tuple of ints: an empty set would make the intervention a no-op."""
    if layers is None:
        return None
    if isinstance(layers, int):
        return (layers,)
    out = tuple(int(x) for x in layers)
    if not out:
        raise ValueError(
            "An empty layer set names no layer (the intervention would do nothing); "
            "give None for every layer, or at least one layer."
        )
    return out


@dataclass(frozen=True)
class Knockout(Intervention):
    """Queries at ``target`` cannot attend to keys at ``source`` in ``layers`` (None = all), every head.

    ``mode="zero"`` sets those post-softmax weights to zero without renormalising (the paper's
    definition); ``mode="mask"`` removes them before the softmax, so the row renormalises
    (Geva et al. 2023). During generation every generated token counts as a ``text`` position.
    """

    source: str | tuple = field(default="eoi", compare=False)
    target: str | tuple = field(default="text", compare=False)
    layers: tuple[int, ...] | None = None
    mode: str = "zero"
    #: The parsed roles; equality compares these, so ``"eoi"`` and ``("eoi",)`` name the same knockout.
    sources: tuple[Role, ...] = field(init=False, repr=False)
    targets: tuple[Role, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in KNOCKOUT_MODES:
            raise ValueError(f"Knockout mode must be one of {KNOCKOUT_MODES}, got {self.mode!r}.")
        object.__setattr__(self, "layers", _layers(self.layers))
        object.__setattr__(self, "sources", parse_roles(self.source))
        object.__setattr__(self, "targets", parse_roles(self.target))

    @classmethod
    def parse(cls, text: str) -> Knockout:
        """The inverse of `name`: ``SRC->TGT[@LAYERS][:MODE]``, roles joined by ``+``, e.g. ``image->eoi+text@0-15:mask``."""
        spec, _, mode = str(text).strip().partition(":")
        spec, _, layers = spec.partition("@")
        src, arrow, tgt = spec.partition("->")
        if not arrow or not src or not tgt:
            raise ValueError(
                f"Knockout {text!r}: write SRC->TGT[@LAYERS][:MODE], e.g. eoi->text or image->eoi+text:mask."
            )
        picked = parse_layer_set(layers, option=f"knockout {text!r}") if layers else None
        return cls(tuple(src.split("+")), tuple(tgt.split("+")), layers=picked, mode=mode or "zero")

    @property
    def name(self) -> str:
        """Stable name used in result tables, e.g. ``eoi->text`` or ``image->eoi+text@0-15:mask``."""
        src = "+".join(str(r) for r in self.sources)
        tgt = "+".join(str(r) for r in self.targets)
        text = f"{src}->{tgt}"
        if self.layers is not None:
            text += "@" + _layer_text(self.layers)
        if self.mode != "zero":
            text += f":{self.mode}"
        return text

    def resolve(self, batch: Batch, model: ModelShape | None = None) -> ResolvedKnockout:
        """Bind this Knockout to ``batch`` (its positions by role, checked against ``model``): the protocol's step."""
        layers = None if self.layers is None else frozenset(self.layers)
        return ResolvedKnockout(
            role_mask(batch, self.sources), role_mask(batch, self.targets), layers, self.mode, f"Knockout {self.name}"
        )


def _layer_text(layers: tuple[int, ...]) -> str:
    if layers and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(str(x) for x in layers)


@dataclass
class ResolvedKnockout(Resolved):
    """A knockout bound to a batch: the blocked entries are target rows x source keys, in ``layers`` (None = all).

    Its site is the attention mask itself (`EDGES`): the attention function reads ``source`` and ``target``
    (`Plan.blocks`); it proves itself by the attention of its layers running through the engine."""

    source: RoleMask
    target: RoleMask
    layers: frozenset[int] | None  # type: ignore[misc]  # a field here, an annotation on the base
    mode: str
    name: str = "Knockout"  # type: ignore[misc]
    site = EDGES

    def __post_init__(self) -> None:
        self.rows = self.target

    def stack_key(self) -> tuple:
        """Knockouts stack when they share layers, mode and whether source and target cover generated tokens."""
        return (ResolvedKnockout, self.layers, self.mode, self.source.generated, self.target.generated)

    @classmethod
    def stack(cls, parts: Sequence[Resolved | None], batch_size: int, length: int) -> ResolvedKnockout:
        """Knockouts of different conditions land in different rows, so their masks merge without interacting."""
        empty = torch.zeros(batch_size, length, dtype=torch.bool)
        knocks = [k if k is None else _as(k, ResolvedKnockout) for k in parts]
        first = next(k for k in knocks if k is not None)
        src = torch.cat([empty if k is None else k.source.prompt for k in knocks])
        tgt = torch.cat([empty if k is None else k.target.prompt for k in knocks])
        return cls(
            RoleMask(src, first.source.generated), RoleMask(tgt, first.target.generated), first.layers, first.mode
        )

    def missing(self, record: Record, n_layers: int) -> str | None:
        """Always None: a knockout has no visit to record; `Run.check_applied` checks instead that the engine's
        attention ran in every layer of every knockout."""
        return None


@renamed("0.2.0", "0.3.0", layer="resid")
@dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Replace the residual stream at ``role``'s position, residual index ``resid``, with ``value`` ([B, D]).

    Residual index ``resid`` is the input of decoder layer ``resid``; only later layers see the change.
    ``resid`` may be ``n_layers`` (the last layer's output). ``layer=`` is the deprecated name of ``resid=``.
    """

    role: str
    resid: int
    value: torch.Tensor

    def __post_init__(self) -> None:
        r = parse_role(self.role)
        if not r.single:
            raise ValueError(f"A patch needs a single-position role (e.g. 'eoi', 'last', 'image[k]'), got {r}.")
        if not isinstance(self.value, torch.Tensor) or self.value.dim() != 2:
            raise ValueError("Patch value must be a [batch, hidden_size] tensor.")

    @property
    def name(self) -> str:
        """A readable name of this Patch, used in messages and in the record of what applied."""
        return f"Patch at {self.role}, residual index {self.resid}"

    def resolve(self, batch: Batch, model: ModelShape | None = None) -> Resolved:
        """Bind this Patch to ``batch`` (its positions by role, checked against ``model``): the protocol's step."""
        pos = batch.index(self.role)
        if self.value.shape[0] != batch.size:
            raise InterventionError(f"Patch value has batch size {self.value.shape[0]}, the batch has {batch.size}.")
        if model is not None and self.value.shape[1] != model.hidden_size:
            raise InterventionError(
                f"Patch value has {self.value.shape[1]} features; the model's residual stream has {model.hidden_size}."
            )
        rows = torch.zeros(batch.size, batch.length, dtype=torch.bool)
        rows[torch.arange(batch.size), pos] = True
        return _ResolvedPatch(RoleMask(rows, False), frozenset({self.resid}), self.value, self.name)


class _ResolvedPatch(Resolved):
    site = "resid"

    def __init__(self, rows: RoleMask, layers: frozenset[int], value: torch.Tensor, name: str) -> None:
        self.rows, self.layers, self.value, self.name = rows, layers, value, name

    def visit(self, value: torch.Tensor, where: Where, record: Record) -> torch.Tensor:
        return self.value[:, None, :].to(value.device, value.dtype).expand_as(value)


@renamed("0.2.0", "0.3.0", layers="resids")
@dataclass(frozen=True)
class Capture(Intervention):
    """Read the residual stream at ``roles`` at residual indices ``resids`` (None = all, 0..n_layers).

    A single-position role gives ``[B, len(resids), D]``. A multi-position role (e.g.
    ``internal_image``) is averaged over its positions (``reduce="mean"``), again ``[B, len(resids), D]``.
    With several images a single-position role names one position per image: it is refused (name the image,
    ``eoi@2``), never averaged over the images.
    ``at`` adds named captures at explicit positions, one per example (e.g. a random text token):
    ``Capture(roles=(), at={"text_sample": [17, 21]})``. ``layers=`` is the deprecated name of ``resids=``.
    One capture per call; it reads what the interventions before it in the call's list left.
    """

    roles: str | tuple = "eoi"
    resids: tuple[int, ...] | None = None
    reduce: str = "mean"
    at: tuple[tuple[str, tuple[int, ...]], ...] | dict | None = None
    parsed: tuple[Role, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.reduce != "mean":
            raise ValueError("Capture.reduce supports 'mean' only.")
        object.__setattr__(self, "resids", _layers(self.resids))
        object.__setattr__(self, "parsed", parse_roles(self.roles) if self.roles else ())
        at = self.at or {}
        at = tuple((str(k), tuple(int(p) for p in v)) for k, v in (at.items() if isinstance(at, dict) else at))
        object.__setattr__(self, "at", at)
        if not self.parsed and not at:
            raise ValueError("A Capture needs at least one role or one explicit position set.")

    @property
    def name(self) -> str:
        """A readable name of this Capture, used in messages and in the record of what applied."""
        return "Capture of " + ", ".join([str(r) for r in self.parsed] + [n for n, _ in self.at or ()])

    def resolve(self, batch: Batch, model: ModelShape | None = None) -> ResolvedCapture:
        """Bind this Capture to ``batch`` (its positions by role, checked against ``model``): the protocol's step."""
        masks: dict[str, torch.Tensor] = {}
        for r in self.parsed:
            why = batch.ambiguous(r)
            if why:
                raise InterventionError(f"Cannot capture role {r}: {why}")
            m = batch.mask(r, require=False)
            empty = [b for b in range(batch.size) if not bool(m[b].any())]
            if empty:
                raise InterventionError(f"Cannot capture role {r}: it is empty in example(s) {empty}.")
            masks[str(r)] = m
        for name, at in self.at or ():  # type: ignore[union-attr]  # a tuple after __post_init__
            if len(at) != batch.size or not all(0 <= p < batch.length for p in at):
                raise InterventionError(
                    f"Capture {name!r} needs one position per example inside the sequence (0..{batch.length - 1})."
                )
            m = torch.zeros(batch.size, batch.length, dtype=torch.bool)
            m[torch.arange(batch.size), torch.tensor(at)] = True
            masks[name] = m
        return ResolvedCapture(masks, self.resids, self.name)


class ResolvedCapture(Resolved):
    """A capture bound to a batch: per name a [B, T] position mask; the residuals there are summed per residual
    index into the call's record (`Record.captured`: sums and counts) and averaged by `residuals`."""

    site = "resid"

    def __init__(self, masks: dict[str, torch.Tensor], resids: tuple[int, ...] | None, name: str = "Capture"):
        self.masks, self.resids, self.name = masks, resids, name
        self.layers = None if resids is None else frozenset(resids)
        self.rows = RoleMask(torch.stack(list(masks.values())).any(0), False)

    def first_affected(self) -> int | None:
        """None: a capture only reads, so what it reads in a shared prefix is read once for every condition."""
        return None

    def stack_key(self) -> tuple:
        """Captures stack when they read the same residual indices under the same names."""
        return (ResolvedCapture, self.resids, tuple(self.masks))

    @classmethod
    def stack(cls, parts: Sequence[Resolved | None], batch_size: int, length: int) -> ResolvedCapture:
        """One capture whose masks are the conditions' masks one after the other (every condition has one)."""
        caps = [_as(p, ResolvedCapture) for p in parts]  # a capture reads in every condition
        first = caps[0]
        return cls({n: torch.cat([p.masks[n] for p in caps]) for n in first.masks}, first.resids, first.name)

    def indices(self, n_layers: int) -> tuple[int, ...]:
        """The residual indices it reads in a model of ``n_layers`` decoder layers."""
        return tuple(range(n_layers + 1)) if self.resids is None else tuple(self.resids)

    def visit(self, value: torch.Tensor, where: Where, record: Record) -> None:
        """Add the residuals at each name's positions to the record's sums and counts; the value is left as it is."""
        for name, mask in self.masks.items():
            sel = RoleMask(mask, False).at(where.positions.cpu(), where.valid.cpu())
            if not bool(sel.any()):
                continue
            total = (value.float().cpu() * sel[..., None]).sum(1)
            count = sel.sum(1).float()
            store = record.captured.setdefault(name, {})
            if where.at in store:
                s, c = store[where.at]
                total, count = total + s, count + c
            store[where.at] = (total, count)
        return None

    def residuals(self, record: Record, n_layers: int) -> dict[str, torch.Tensor]:
        """Captured residuals per name: [B, len(resids), D], averaged over each name's positions."""
        why = self.missing(record, n_layers)
        if why:
            raise InterventionError(why)
        out = {}
        for name in self.masks:
            per = record.captured[name]
            sums = torch.stack([per[l][0] for l in self.indices(n_layers)], dim=1)
            counts = torch.stack([per[l][1] for l in self.indices(n_layers)], dim=1)
            out[name] = sums / counts[..., None]
        return out

    def missing(self, record: Record, n_layers: int) -> str | None:
        """Why a name lacks a residual index, or saw fewer positions than its mask holds; None when complete."""
        for name, mask in self.masks.items():
            per = record.captured.get(name, {})
            lacking = [l for l in self.indices(n_layers) if l not in per]
            if lacking:
                return f"Capture of {name} never reached residual indices {lacking}."
            want = mask.sum(1).float()
            if any(not torch.equal(per[l][1], want) for l in self.indices(n_layers)):
                return f"Capture of {name} saw only part of its positions."
        return None


@dataclass(frozen=True)
class AttentionStats(Intervention):
    """The paper's cross-modal attention statistics (Eq. 1): per decoder layer, the attention every key position
    receives from the text rows, summed over heads and averaged over the rows (`VLM.forward`'s
    ``cross_modal_attention``; ``attention_stats=True`` is this). Reads the ``pattern`` site at the text rows
    only, so no full attention map is ever formed."""

    name = "Cross-modal attention statistics"

    def resolve(self, batch: Batch, model: ModelShape | None = None) -> ResolvedStats:
        """Bind this AttentionStats to ``batch`` (its positions by role, checked against ``model``): the protocol's step."""
        return ResolvedStats(role_mask(batch, "text"))


class ResolvedStats(Resolved):
    """`AttentionStats` bound to a batch: reads the attention probabilities at the text rows of every layer."""

    site = "pattern"
    layers = None
    name = AttentionStats.name

    def __init__(self, rows: RoleMask) -> None:
        self.rows = rows

    def stack_key(self) -> tuple:
        """Statistics always stack: there is nothing to tell two apart but their rows."""
        return (ResolvedStats,)

    @classmethod
    def stack(cls, parts: Sequence[Resolved | None], batch_size: int, length: int) -> ResolvedStats:
        """One reader over every condition's text rows (every condition asks for the statistics)."""
        stats = [_as(p, ResolvedStats) for p in parts]  # statistics are asked of every condition
        return cls(RoleMask(torch.cat([p.rows.prompt for p in stats]), stats[0].rows.generated))

    def visit(self, value: torch.Tensor, where: Where, record: Record) -> None:
        """Store this layer's column attention (`column_attention`) in the record; the probabilities are left."""
        record.column_attention[where.at] = column_attention(value, where.valid).detach()
        return None


def column_attention(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, K]: ``sum_h mean_i probs[b, h, i, k]`` over the valid rows i of ``probs`` [B, H, R, K] (Eq. 1's c_l)."""
    rows = valid.to(probs.device, probs.dtype)
    return (probs.sum(1) * rows[:, :, None]).sum(1) / rows.sum(1).clamp(min=1)[:, None]


@dataclass(frozen=True, eq=False)
class Hook(Intervention):
    """``fn`` at a named ``site`` of decoder layer (or residual index) ``at``, restricted to the positions of ``roles``.

    ``site`` is one of `SITES`: ``"resid"`` (the residual stream entering decoder layer ``at``, as `Patch`;
    ``at`` up to n_layers), ``"attn_out"`` / ``"mlp_out"`` (decoder layer ``at``'s attention / MLP output before
    it is added to the residual), ``"head"`` (per-head attention output before the output projection) or
    ``"pattern"`` (the attention probabilities of the query rows at ``roles``). ``fn(value)`` (or
    ``fn(value, where)``, where: a `Where`) returns a tensor of the same shape to replace the value, or None to
    only read it. It is called once per model call that computes positions at ``roles``: the whole prompt in a
    forward, then each generated token (``text``) during generation; under several conditions, once per
    condition. See docs/contributing/intervention.md.
    """

    site: str
    at: int
    roles: str | tuple
    fn: Callable

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"Hook site must be one of {tuple(SITES)}, got {self.site!r}.")
        if isinstance(self.at, bool) or not isinstance(self.at, int) or self.at < 0:
            raise ValueError(f"Hook at must be a residual index or decoder layer (an int >= 0), got {self.at!r}.")
        parse_roles(self.roles)
        if not callable(self.fn):
            raise ValueError(f"Hook fn must be callable, got {type(self.fn).__name__}.")

    @property
    def name(self) -> str:
        """A readable name of this Hook, used in messages and in the record of what applied."""
        roles = "+".join(str(r) for r in parse_roles(self.roles))
        return f"Hook {getattr(self.fn, '__name__', type(self.fn).__name__)} at {self.site}[{self.at}] on {roles}"

    def resolve(self, batch: Batch, model: ModelShape | None = None) -> Resolved:
        """Bind this Hook to ``batch`` (its positions by role, checked against ``model``): the protocol's step."""
        return _ResolvedHook(self, role_mask(batch, self.roles))


class _ResolvedHook(Resolved):
    def __init__(self, hook: Hook, rows: RoleMask) -> None:
        self.hook, self.rows, self.name = hook, rows, hook.name
        self.site, self.layers = hook.site, frozenset({hook.at})
        self.with_where = _takes_two(hook.fn)

    def visit(self, value: torch.Tensor, where: Where, record: Record) -> torch.Tensor | None:
        return self.hook.fn(value, where) if self.with_where else self.hook.fn(value)


def _as(r: Resolved | None, kind: type[_R]) -> _R:
    """``r`` as the resolved kind its stack key promises (stacking groups parts by `Resolved.stack_key`)."""
    if not isinstance(r, kind):
        raise TypeError(f"{kind.__name__} stacks only with its own kind in every condition, got {type(r).__name__}.")
    return r


def _takes_two(fn: Callable) -> bool:
    """Whether ``fn`` accepts a second positional argument (the `Where`)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = [p.kind for p in params]
    positional = [k for k in kinds if k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return inspect.Parameter.VAR_POSITIONAL in kinds or len(positional) >= 2
