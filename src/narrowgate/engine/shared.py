"""Shared-prefix execution: several conditions on one batch, the unchanged prefix computed once.

Attention is causal, so positions before the first one an intervention touches compute the same
keys and values in every condition. The prefix (the image, typically nearly all of the sequence)
runs once and fills a KV cache. Forwards then run the suffixes of many conditions in one pass: the
conditions become batch rows (condition-major: row ``c * B + b``), every row attends to the one
shared prefix without copying it (`narrowgate.compat.PrefixCache`, `engine.attention.with_prefix`),
and the conditions' interventions are stacked into one plan (`stack`, through each one's
`Resolved.stack`), as many per pass as the memory budget holds (`engine.budget`). Generation runs each
condition on the cache and crops it back to the prefix afterwards. Results equal full recomputation (tests).
`engine.runner` schedules all of this.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .. import compat
from ..batch import Batch
from .interventions import Knockout, Patch
from .protocol import Intervention, InterventionError, ModelShape, resolve_all
from .state import Plan

if TYPE_CHECKING:
    from transformers import Cache


@dataclass(frozen=True)
class Condition:
    """A named set of interventions (the baseline has none): ``knockouts`` and ``patches`` are shorthands that
    apply before ``interventions``."""

    name: str
    knockouts: tuple[Knockout, ...] = ()
    patches: tuple[Patch, ...] = ()
    interventions: tuple[Intervention, ...] = ()

    def __post_init__(self) -> None:
        for f in ("knockouts", "patches", "interventions"):
            object.__setattr__(self, f, tuple(getattr(self, f)))

    @property
    def every(self) -> tuple:
        """Its interventions in the order they apply."""
        return (*self.knockouts, *self.patches, *self.interventions)


@dataclass
class ConditionOutput:
    """Per condition: next-token logits at ``last`` ([B, V], float32, CPU), residuals, attention statistics.

    ``tail_logits`` ([B, keep, V]) holds the logits of the last ``keep`` positions when more than one
    was asked for (teacher-forced scoring of a continuation).
    """

    last_logits: torch.Tensor
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)
    cross_modal_attention: object | None = None
    tail_logits: torch.Tensor | None = None


@dataclass
class SharedPrefix:
    """A batch's first ``length`` positions, run once: per decoder layer its keys and values ([B, kv_heads,
    length, head_dim]; None for a recurrent layer), the model inputs of the rest (the suffix), residuals captured
    in the prefix and, per recurrent layer of a hybrid decoder, the prefix's projections (`engine.recurrent`),
    from which every suffix row's view of the prefix is computed."""

    batch: Batch
    length: int
    kv: list
    suffix: dict
    captured: dict = field(default_factory=dict)
    mixers: dict = field(default_factory=dict)


#: What `as_conditions` accepts: `Condition` objects, or a mapping name -> {"knockouts": ..., "patches": ...,
#: "interventions": ...} or name -> a list of interventions.
Conditions = Iterable[Condition] | dict[str, dict[str, Any] | Iterable[Intervention]]


def as_conditions(conditions: Conditions) -> list[Condition]:
    """Accept Condition objects or a mapping name -> dict(knockouts=..., patches=..., interventions=...) or
    name -> list of interventions."""
    if isinstance(conditions, dict):
        out = []
        for name, v in conditions.items():
            if isinstance(v, dict):
                unknown = sorted(set(v) - {"knockouts", "patches", "interventions"})
                if unknown:
                    raise TypeError(
                        f"Condition {name!r}: unknown keys {unknown}; use knockouts, patches, interventions."
                    )
                out.append(Condition(name, v.get("knockouts", ()), v.get("patches", ()), v.get("interventions", ())))
            else:
                out.append(Condition(name, interventions=tuple(v)))
        return out
    out = list(conditions)
    if not all(isinstance(c, Condition) for c in out):
        raise TypeError(
            "conditions must be Condition objects or a mapping name -> {'knockouts': ..., 'patches': ..., "
            "'interventions': ...}."
        )
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"Condition names must be unique, got {names}.")
    return out


def first_affected(batch: Batch, condition: Condition | Plan, model: ModelShape | None = None) -> int:
    """The earliest position (over the batch) whose computation a condition can change (`Resolved.first_affected`).

    A `Condition` is resolved against ``batch`` here (``model``: for interventions that check the model's sizes)."""
    firsts = [batch.length - 1]
    if isinstance(condition, Plan):
        f = condition.first_affected()
        firsts += [] if f is None else [f]
    else:
        firsts += [f for r in resolve_all(condition.every, batch, model) if (f := r.first_affected()) is not None]
    return min(firsts)


def prefix_length(
    batch: Batch,
    conditions: list,
    *,
    attention_stats: bool = False,
    keep: int = 1,
    causal_from: int = 0,
    model: ModelShape | None = None,
) -> int:
    """How many leading positions all conditions (`Condition` objects or resolved `Plan` objects) share (the suffix
    keeps at least the last ``keep`` positions); 0 when no prefix can be shared.

    ``causal_from``: the first position from which the model's own attention is causal (positions before it may
    attend to later ones, as PaliGemma's whole prompt does); a prefix must reach it to be computable alone."""
    p = min([first_affected(batch, c, model) for c in conditions] + [batch.length - keep])
    if attention_stats:
        text = batch.mask("text").any(0).nonzero()
        p = min(p, int(text.min()))
    # The suffix must not contain image tokens: the images are encoded in the prefix pass.
    return p if p >= max(batch.end_of_images, causal_from) else 0


def split_inputs(inputs: dict, P: int) -> tuple[dict, dict]:
    """Model inputs of the prefix pass and of the suffix passes.

    Per-token tensors (shaped like ``input_ids``) are cut at ``P``; image inputs go to the prefix
    only. The suffix keeps the full attention mask, as a cached forward expects.
    """
    ids = inputs["input_ids"]
    prefix, suffix = {}, {}
    for k, v in inputs.items():
        per_token = isinstance(v, torch.Tensor) and v.shape[-2:] == ids.shape and not k.startswith("pixel_values")
        if k == "attention_mask":
            prefix[k], suffix[k] = v[:, :P], v
        elif per_token:
            prefix[k], suffix[k] = v[..., :P], v[..., P:]
        else:
            prefix[k] = v
    return prefix, suffix


def crop(cache: Cache, P: int) -> None:
    """Drop everything a condition appended to the shared cache."""
    extra = compat.cached_positions(cache) - P
    if extra > 0:
        cache.crop(-extra)


def dense_rows(sources: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start..stop-1`` of a [C, ...] boolean mask as a dense tensor; ``sources`` may be sparse COO (a scan over
    thousands of positions), whose entries of those rows are found by bisection, not by a pass over all of them."""
    if not sources.is_sparse:
        return sources[start:stop]
    sources = sources.coalesce()  # sorted by row; free when already coalesced
    index, values = sources.indices(), sources.values()
    lo, hi = torch.searchsorted(index[0], torch.tensor([start, stop])).tolist()
    out = torch.zeros(stop - start, *sources.shape[1:], dtype=torch.bool)
    at = index[:, lo:hi]
    out[tuple([at[0] - start, *at[1:]])] = values[lo:hi].bool()
    return out


def repeat_rows(suffix: dict, n: int) -> dict:
    """The suffix inputs of ``n`` conditions stacked condition-major along the batch axis."""
    out = {}
    for k, v in suffix.items():
        out[k] = v.repeat(*([1] * (v.dim() - 2)), n, 1) if isinstance(v, torch.Tensor) else v
    return out


def stack(plans: list[Plan], batch_size: int, length: int) -> Plan:
    """One plan over ``len(plans) * batch_size`` rows equal to the given plans (each over the same batch) side by side.

    The i-th resolved intervention of a kind (`Resolved.stack_key`) of every condition stacks into one
    (`Resolved.stack`), absent in the rows of conditions that lack it: knockouts merge their masks, a patch or
    hook visits each condition's rows apart, captures and attention statistics (the same in every condition)
    cover every row. Each condition's interventions keep their order.
    """
    first, C = plans[0], len(plans)
    stacked = []
    for field_name in ("knockouts", "edits"):
        groups: dict = {}
        after: dict = {}  # group -> groups that some condition applies after it
        for c, plan in enumerate(plans):
            seen: dict = {}
            previous = None
            for r in getattr(plan, field_name):
                key = r.stack_key()
                seen[key] = seen.get(key, -1) + 1
                group = (key, seen[key])
                groups.setdefault(group, [None] * C)[c] = r
                after.setdefault(group, set())
                if previous is not None:
                    after[previous].add(group)
                previous = group
        stacked.append(
            tuple(
                type(next(r for r in groups[g] if r is not None)).stack(groups[g], batch_size, length)
                for g in _in_order(list(groups), after)
            )
        )
    return Plan(first.layer_of, first.n_layers, stacked[0], stacked[1])


def _in_order(groups: list, after: dict) -> list:
    """``groups`` ordered so that every condition's interventions keep their order (first appearance breaks ties)."""
    before = {g: 0 for g in groups}
    for g in groups:
        for h in after[g]:
            before[h] += 1
    out, ready = [], [g for g in groups if before[g] == 0]
    while ready:
        g = ready.pop(0)
        out.append(g)
        for h in sorted(after[g], key=groups.index):
            before[h] -= 1
            if before[h] == 0:
                ready.append(h)
        ready.sort(key=groups.index)
    if len(out) != len(groups):
        raise InterventionError(
            "Two conditions apply the same interventions in different orders; give them one order, or run them "
            "in separate calls."
        )
    return out


def repeat_captured(captured: dict, n: int) -> dict:
    """Residual sums of the prefix pass ({role: {index: (sum [B, D], count [B])}}) repeated for ``n`` conditions."""
    return {name: {i: (s.repeat(n, 1), c.repeat(n)) for i, (s, c) in per.items()} for name, per in captured.items()}
