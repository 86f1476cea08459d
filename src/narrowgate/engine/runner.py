"""Scheduling over a shared prefix: several conditions on one batch, the unchanged prefix computed once.

`Runner` decides what runs where — the prefix pass, the suffix passes (conditions stacked as batch rows,
as many per pass as the score budget allows), generation on a cached prefix — and hands every model call
to the `VLM` it serves (`VLM._running`: the plan active, then the check that it applied). `VLM`'s
`forward_conditions`, `forward_knockouts`, `generate_conditions`, `generate_knockouts` and
`share_prefix` delegate here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from .. import compat
from ..batch import Batch
from . import shared
from .interventions import AttentionStats, Capture, Knockout, ResolvedStats
from .state import InterventionError, Plan, Record, ResolvedKnockout, RoleMask, Run
from .stats import build

if TYPE_CHECKING:
    from ..vlm import VLM


class Runner:
    """The shared-prefix scheduler of one `VLM`."""

    def __init__(self, vlm: VLM):
        self.vlm = vlm

    # --- the prefix --------------------------------------------------------------------------
    def prefix_cache(self, batch: Batch, P: int, reads: Plan | None = None):
        """Run the first ``P`` positions once, with the call-level reads of ``reads`` (captures) active: returns
        the run, the cache and the suffix's model inputs. The reads are checked once the suffix has run too."""
        vlm = self.vlm
        prefix, suffix = shared.split_inputs(vlm.model_inputs(batch), P)
        plan = reads or vlm._plan(batch)
        # A cache that keeps every position in every layer: the model's own would keep only the last window of a
        # sliding-window layer (Gemma 3, Cohere 2), and the suffix attends to the whole prefix through its mask.
        with vlm._running(plan, check=False) as run:
            out = vlm.model(**prefix, **compat.cache_kwargs(DynamicCache()), use_cache=True, **vlm._keep_last())
        return run, compat.output_cache(out), suffix

    def share_prefix(self, batch: Batch, length: int, capture=None) -> shared.SharedPrefix:
        """Run the first ``length`` positions once; the result serves any number of suffix passes."""
        family = self.vlm.family
        if not 0 < length < batch.length or length < batch.end_of_images or length < family.causal_from(batch.inputs):
            raise InterventionError(
                f"A shared prefix of {length} positions must hold every example's whole images and leave a suffix "
                f"(images end at {batch.end_of_images - 1}, the batch has {batch.length} positions); "
                "batch examples whose images end at the same position (same prompt length), or one at a time."
            )
        reads = None if capture is None else self.vlm._plan(batch, capture=capture)
        run, cache, suffix = self.prefix_cache(batch, length, reads)
        return shared.SharedPrefix(batch, length, compat.cache_kv(cache), suffix, run.record.captured)

    # --- suffix passes -----------------------------------------------------------------------
    def suffix_pass(self, prefix: shared.SharedPrefix, plan: Plan, n: int, keep: int = 1) -> tuple[torch.Tensor, Run]:
        """The suffix of ``n`` conditions (``plan`` over their n * B rows) in one pass: the logits of the last
        ``keep`` positions, [n * B, keep, V] (next-token logits [n * B, V] when ``keep`` is 1), and the run."""
        vlm = self.vlm
        record = Record(captured=shared.repeat_captured(prefix.captured, n))
        cache = compat.PrefixCache(vlm.n_layers, prefix.length)
        with vlm._running(replace(plan, prefix=prefix.kv), record) as run:
            out = vlm.model(
                **shared.repeat_rows(prefix.suffix, n),
                **compat.cache_kwargs(cache),
                use_cache=True,
                **vlm._keep_last(keep),
            )
        return (out.logits[:, -keep:].float() if keep > 1 else out.logits[:, -1].float()), run

    def suffix_passes(self, prefix: shared.SharedPrefix, plans: list[Plan], keep: int = 1):
        """The conditions' ``plans`` on ``prefix``, stacked as batch rows, as many per pass as memory allows.

        Yields, per pass, how many conditions it held, its logits (as `suffix_pass`) and its run."""
        b = prefix.batch
        step = shared.rows_per_pass(b.size, self.vlm._heads(), b.length - prefix.length, b.length)
        for s in range(0, len(plans), step):
            part = plans[s : s + step]
            logits, run = self.suffix_pass(prefix, shared.stack(part, b.size, b.length), len(part), keep)
            yield len(part), logits, run

    # --- several conditions ------------------------------------------------------------------
    def plans(self, batch: Batch, conds: list[shared.Condition], common=(), capture=None, attention_stats=False):
        """Each condition resolved against ``batch``, with the interventions common to every condition after its own.

        Captures and attention statistics read once for every condition: they are refused inside a condition."""
        for c in conds:
            reads = [iv for iv in c.every if isinstance(iv, (Capture, AttentionStats))]
            if reads:
                raise InterventionError(
                    f"Condition {c.name!r} holds a {type(reads[0]).__name__}, which reads for every condition at once: "
                    "pass it as capture= / attention_stats=True (or in interventions=) of the call."
                )
        return [
            self.vlm._plan(batch, capture=capture, attention_stats=attention_stats, interventions=(*c.every, *common))
            for c in conds
        ]

    def prefix_length(self, batch: Batch, plans: list[Plan], keep: int = 1) -> int:
        return shared.prefix_length(batch, plans, keep=keep, causal_from=self.vlm.family.causal_from(batch.inputs))

    def forward_conditions(
        self, batch: Batch, conditions, *, capture=None, attention_stats=False, keep=1, interventions=()
    ) -> dict[str, shared.ConditionOutput]:
        """See `VLM.forward_conditions`."""
        vlm = self.vlm
        conds = shared.as_conditions(conditions)
        keep = max(1, int(keep))
        plans = self.plans(batch, conds, interventions, capture, attention_stats)
        attention_stats = any(isinstance(r, ResolvedStats) for r in plans[0].edits)
        P = self.prefix_length(batch, plans, keep)
        results = {}
        if P == 0:
            for c, plan in zip(conds, plans):
                out = vlm._forward_plan(batch, plan, attention_stats)
                tail = out.logits[:, -keep:].float().cpu() if keep > 1 else None
                results[c.name] = shared.ConditionOutput(
                    out.logits[:, -1].float().cpu(), out.residuals, out.cross_modal_attention, tail
                )
            return results
        reads = [r for r in plans[0].edits if r.first_affected() is None]
        run, cache, suffix = self.prefix_cache(batch, P, Plan(vlm.layer_of, vlm.n_layers, (), tuple(reads)))
        prefix = shared.SharedPrefix(batch, P, compat.cache_kv(cache), suffix, run.record.captured)
        B, done = batch.size, 0
        for n, logits, run in self.suffix_passes(prefix, plans, keep):
            part, done = conds[done : done + n], done + n
            logits = logits.cpu().view(n, B, *(() if keep == 1 else (keep,)), -1)
            residuals = {k: v.view(n, B, *v.shape[1:]) for k, v in run.residuals().items()}
            cols = {l: t.view(n, B, -1) for l, t in run.record.column_attention.items()}
            for i, c in enumerate(part):
                cma = build(batch, {l: t[i] for l, t in cols.items()}, vlm.n_layers) if attention_stats else None
                last, tail = (logits[i], None) if keep == 1 else (logits[i][:, -1], logits[i])
                results[c.name] = shared.ConditionOutput(last, {k: v[i] for k, v in residuals.items()}, cma, tail)
        return results

    @staticmethod
    def check_sources(batch: Batch, sources: torch.Tensor) -> tuple[int, int]:
        """Refuse knockout sources not shaped [C, B, T] for ``batch``; returns (C, B)."""
        if sources.dim() != 3 or tuple(sources.shape[1:]) != (batch.size, batch.length):
            raise InterventionError(
                f"sources must be [C, {batch.size}, {batch.length}] for this batch, got {tuple(sources.shape)}."
            )
        return sources.shape[0], sources.shape[1]

    def forward_knockouts(
        self, prefix: shared.SharedPrefix, sources: torch.Tensor, *, target="text", layers=None, mode: str = "mask"
    ) -> torch.Tensor:
        """See `VLM.forward_knockouts`."""
        vlm, batch = self.vlm, prefix.batch
        C, B = self.check_sources(batch, sources)
        each = isinstance(layers, list) and not all(isinstance(x, int) for x in layers)
        per = list(layers) if each else [layers] * C
        if len(per) != C:
            raise InterventionError(f"layers lists {len(per)} entries for {C} knockouts; give one per knockout.")
        windows: dict = {}  # one resolution (which validates target, layers and mode) per distinct window
        for l in per:
            key = _window(l)
            if key not in windows:
                windows[key] = vlm._plan(batch, knockouts=(Knockout("image", target, layers=key, mode=mode),))
        resolved = [windows[_window(l)].knockouts[0] for l in per]
        tgt = resolved[0].target
        if int(tgt.prompt.any(0).nonzero().min()) < prefix.length:
            raise InterventionError(f"Knockout target {target!r} starts inside the shared prefix; share a shorter one.")
        plans = [
            Plan(vlm.layer_of, vlm.n_layers, (ResolvedKnockout(RoleMask(src.bool(), False), tgt, k.layers, mode),))
            for src, k in zip(sources, resolved)
        ]
        return torch.cat([logits.cpu().view(n, B, -1) for n, logits, _ in self.suffix_passes(prefix, plans)])

    # --- generation --------------------------------------------------------------------------
    def generate_conditions(
        self, batch: Batch, conditions, *, max_new_tokens: int = 20, interventions=(), **kwargs
    ) -> dict[str, torch.Tensor]:
        """See `VLM.generate_conditions`."""
        conds = shared.as_conditions(conditions)
        plans = self.plans(batch, conds, interventions)
        reads = [r.name for p in plans for r in p.edits if r.first_affected() is None or isinstance(r, ResolvedStats)]
        if reads:
            raise InterventionError(f"Generation takes no reads ({reads[0]}); read with forward or forward_conditions.")
        P = self.prefix_length(batch, plans)
        return dict(zip((c.name for c in conds), self.generate_plans(batch, plans, P, max_new_tokens, kwargs)))

    def generate_knockouts(
        self,
        batch: Batch,
        sources: torch.Tensor,
        *,
        target="text",
        mode: str = "mask",
        max_new_tokens: int = 20,
        **kwargs,
    ) -> list[torch.Tensor]:
        """See `VLM.generate_knockouts`."""
        vlm = self.vlm
        self.check_sources(batch, sources)
        template = vlm._plan(batch, knockouts=(Knockout("image", target, mode=mode),))
        tgt = template.knockouts[0].target
        P = self.prefix_length(batch, [template])
        plans = [
            Plan(vlm.layer_of, vlm.n_layers, (ResolvedKnockout(RoleMask(src.bool(), False), tgt, None, mode),))
            for src in sources
        ]
        return self.generate_plans(batch, plans, P, max_new_tokens, kwargs)

    def generate_plans(
        self, batch: Batch, plans: list[Plan], P: int, max_new_tokens: int, kwargs: dict
    ) -> list[torch.Tensor]:
        """Generate once per plan, the first ``P`` positions cached once with stock attention (P = 0: nothing
        shared, every plan reads the whole prompt)."""
        vlm = self.vlm
        inputs = vlm.model_inputs(batch)
        cache = None
        if P:
            _, cache, _ = self.prefix_cache(batch, P)
            inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        kwargs = vlm._gen_kwargs(kwargs)
        results = []
        for plan in plans:
            try:
                with vlm._running(plan):
                    out = vlm.model.generate(
                        **inputs, **(compat.cache_kwargs(cache) if P else {}), max_new_tokens=max_new_tokens, **kwargs
                    )
            finally:
                if P:
                    shared.crop(cache, P)
            results.append(out.cpu())
        return results


def _window(layers) -> tuple[int, ...] | None:
    """A knockout's layer window as a hashable key: None (every layer) or a tuple."""
    return None if layers is None else (layers,) if isinstance(layers, int) else tuple(layers)
