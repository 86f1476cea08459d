"""Shared-prefix execution: several conditions on one batch, the unchanged prefix computed once.

Attention is causal, so positions before the first one an intervention touches compute the same
keys and values in every condition. The prefix (the image, typically nearly all of the sequence)
runs once and fills a KV cache; each condition then runs only the suffix on that cache, which is
cropped back to the prefix after every condition. Results equal full recomputation (tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..batch import Batch
from .interventions import Knockout, Patch


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


def as_conditions(conditions) -> list[Condition]:
    """Accept Condition objects or a mapping name -> dict(knockouts=..., patches=...)."""
    if isinstance(conditions, dict):
        return [Condition(name, tuple(v.get("knockouts", ())), tuple(v.get("patches", ()))) for name, v in conditions.items()]
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


def prefix_length(batch: Batch, conditions: list[Condition], *, attention_stats: bool, keep: int = 1) -> int:
    """How many leading positions all conditions share (the suffix keeps at least the last ``keep`` positions)."""
    p = min([first_affected(batch, c) for c in conditions] + [batch.length - keep])
    if attention_stats:
        text = batch.mask("text").any(0).nonzero()
        p = min(p, int(text.min()))
    end_of_image = max(lay.end for lay in batch.layouts) + 1
    # The suffix must not contain image tokens: the image is encoded in the prefix pass.
    return p if p >= end_of_image else 0


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
