"""Shared-prefix execution: several conditions on one batch, the unchanged prefix computed once.

Attention is causal, so positions before the first one an intervention touches compute the same
keys and values in every condition. The prefix (the image, typically nearly all of the sequence)
runs once and fills a KV cache. Forwards then run the suffixes of many conditions in one pass: the
conditions become batch rows (condition-major: row ``c * B + b``), every row attends to the one
shared prefix without copying it (`narrowgate.compat.PrefixCache`, `engine.attention.with_prefix`),
and the conditions' interventions are stacked into one plan (`stack`), as many per pass as the memory
budget holds (`engine.budget`). Generation runs each condition
on the cache and crops it back to the prefix afterwards. Results equal full recomputation (tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..batch import Batch
from .interventions import Knockout, Patch
from .state import Plan, ResolvedKnockout, RoleMask


@dataclass(frozen=True)
class Condition:
    """A named set of interventions (the baseline has none)."""

    name: str
    knockouts: tuple[Knockout, ...] = ()
    patches: tuple[Patch, ...] = ()


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
    length, head_dim]), the model inputs of the rest (the suffix) and residuals captured in the prefix."""

    batch: Batch
    length: int
    kv: list
    suffix: dict
    captured: dict = field(default_factory=dict)


def as_conditions(conditions) -> list[Condition]:
    """Accept Condition objects or a mapping name -> dict(knockouts=..., patches=...)."""
    if isinstance(conditions, dict):
        return [
            Condition(name, tuple(v.get("knockouts", ())), tuple(v.get("patches", ())))
            for name, v in conditions.items()
        ]
    out = list(conditions)
    if not all(isinstance(c, Condition) for c in out):
        raise TypeError("conditions must be Condition objects or a mapping name -> {'knockouts': ..., 'patches': ...}.")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"Condition names must be unique, got {names}.")
    return out


def first_affected(batch: Batch, condition: Condition) -> int:
    """The earliest position (over the batch) whose computation a condition can change."""
    firsts = [batch.length - 1]
    for k in condition.knockouts:
        cols = batch.mask(k.targets).any(0).nonzero()
        if len(cols):
            firsts.append(int(cols.min()))
    for p in condition.patches:
        firsts.append(int(batch.index(p.role).min()))
    return min(firsts)


def prefix_length(
    batch: Batch, conditions: list[Condition], *, attention_stats: bool, keep: int = 1, causal_from: int = 0
) -> int:
    """How many leading positions all conditions share (the suffix keeps at least the last ``keep`` positions).

    ``causal_from``: the first position from which the model's own attention is causal (positions before it may
    attend to later ones, as PaliGemma's whole prompt does); a prefix must reach it to be computable alone."""
    p = min([first_affected(batch, c) for c in conditions] + [batch.length - keep])
    if attention_stats:
        text = batch.mask("text").any(0).nonzero()
        p = min(p, int(text.min()))
    end_of_image = max(lay.end for lay in batch.layouts) + 1
    # The suffix must not contain image tokens: the image is encoded in the prefix pass.
    return p if p >= max(end_of_image, causal_from) else 0


def split_inputs(inputs: dict, P: int) -> tuple[dict, dict]:
    """Model inputs of the prefix pass and of the suffix passes.

    Per-token tensors (shaped like ``input_ids``) are cut at ``P``; image inputs go to the prefix
    only. The suffix keeps the full attention mask, as a cached forward expects.
    """
    ids = inputs["input_ids"]
    prefix, suffix = {}, {}
    for k, v in inputs.items():
        per_token = isinstance(v, torch.Tensor) and v.shape[-2:] == ids.shape and k != "pixel_values"
        if k == "attention_mask":
            prefix[k], suffix[k] = v[:, :P], v
        elif per_token:
            prefix[k], suffix[k] = v[..., :P], v[..., P:]
        else:
            prefix[k] = v
    return prefix, suffix


def crop(cache, P: int) -> None:
    """Drop everything a condition appended to the shared cache."""
    extra = cache.get_seq_length() - P
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


def _stacked(parts: list, C: int, fill: torch.Tensor) -> torch.Tensor:
    return torch.cat([fill if p is None else p for p in parts[:C]], dim=0)


def stack(plans: list[Plan], batch_size: int, length: int) -> Plan:
    """One plan over ``len(plans) * batch_size`` rows equal to the given plans (each over the same batch) side by side.

    Knockouts (and patches) of different conditions land in different rows, so they merge without
    interacting: the i-th knockout with given layers and mode of every condition becomes one knockout
    whose masks are empty in the rows of conditions that lack it. Captures and attention statistics,
    the same for every condition, are repeated.
    """
    first, C, B = plans[0], len(plans), batch_size
    knockouts, patches = [], []
    empty = torch.zeros(B, length, dtype=torch.bool)
    groups: dict = {}
    for c, plan in enumerate(plans):
        seen: dict = {}
        for k in plan.knockouts:
            kind = (k.layers, k.mode, k.source.generated, k.target.generated)
            seen[kind] = seen.get(kind, -1) + 1
            groups.setdefault((*kind, seen[kind]), [None] * C)[c] = k
    for (layers, mode, src_gen, tgt_gen, _), ks in groups.items():
        src = _stacked([None if k is None else k.source.prompt for k in ks], C, empty)
        tgt = _stacked([None if k is None else k.target.prompt for k in ks], C, empty)
        knockouts.append(ResolvedKnockout(RoleMask(src, src_gen), RoleMask(tgt, tgt_gen), layers, mode))
    patch_groups: dict = {}
    for c, plan in enumerate(plans):
        seen = {}
        for layer, pos, value in plan.patches:
            seen[layer] = seen.get(layer, -1) + 1
            patch_groups.setdefault((layer, seen[layer]), [None] * C)[c] = (pos, value)
    for (layer, _), ps in patch_groups.items():
        like = next(p for p in ps if p is not None)[1]
        pos = _stacked([None if p is None else p[0] for p in ps], C, torch.full((B,), -1, dtype=torch.long))
        value = _stacked([None if p is None else p[1] for p in ps], C, torch.zeros_like(like))
        patches.append((layer, pos, value))
    return Plan(
        first.layer_of,
        first.n_layers,
        tuple(knockouts),
        tuple(patches),
        {name: list(pos) * C for name, pos in first.capture_positions.items()},
        first.capture_resids,
        None if first.text is None else RoleMask(first.text.prompt.repeat(C, 1), first.text.generated),
    )


def repeat_captured(captured: dict, n: int) -> dict:
    """Residual sums of the prefix pass ({role: {index: (sum [B, D], count [B])}}) repeated for ``n`` conditions."""
    return {name: {i: (s.repeat(n, 1), c.repeat(n)) for i, (s, c) in per.items()} for name, per in captured.items()}
