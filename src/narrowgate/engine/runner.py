"""Scheduling over a shared prefix: several conditions on one batch, the unchanged prefix computed once.

`Runner` decides what runs where — the prefix pass, the suffix passes (conditions stacked as batch rows,
as many per pass as the memory budget holds, `engine.budget`), generation on a cached prefix — and hands every model call
to the `VLM` it serves (`VLM._running`: the plan active, then the check that it applied). `VLM`'s
`forward_conditions`, `forward_knockouts`, `generate_conditions`, `generate_knockouts` and
`share_prefix` delegate here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import torch

from .. import compat
from ..batch import Batch
from . import budget, recurrent, shared
from .interventions import AttentionStats, Capture, Knockout, ResolvedStats
from .state import InterventionError, Plan, Record, ResolvedKnockout, RoleMask, Run
from .stats import build

if TYPE_CHECKING:
    from transformers import Cache

    from ..vlm import VLM
    from .protocol import Intervention

#: A knockout's decoder layers: one, several, or None (every layer).
LayerWindow = int | Sequence[int] | None
#: The plans of a run of conditions: their list, or a function (start, stop) -> those conditions' plans.
Plans = list[Plan] | Callable[[int, int], list[Plan]]


class Runner:
    """The shared-prefix scheduler of one `VLM`."""

    def __init__(self, vlm: VLM) -> None:
        self.vlm = vlm

    # --- the prefix --------------------------------------------------------------------------
    def prefix_cache(self, batch: Batch, P: int, reads: Plan | None = None) -> tuple[Run, Cache, dict]:
        """Run the first ``P`` positions once, with the call-level reads of ``reads`` (captures) active: returns
        the run, the cache and the suffix's model inputs. The reads are checked once the suffix has run too."""
        vlm = self.vlm
        prefix, suffix = shared.split_inputs(vlm.model_inputs(batch), P)
        plan = replace(reads or vlm._plan(batch), record_mixers=bool(vlm.mixers))
        # A cache that keeps every position in every attention layer: the model's own would keep only the last
        # window of a sliding-window layer (Gemma 3, Cohere 2), and the suffix attends to the whole prefix through
        # its mask. The model fills it in place (read here, not from the output, which BLIP-2 nests in its LM's).
        cache = compat.prefix_pass_cache(vlm.n_layers, set(vlm.mixers))
        with vlm._running(plan, check=False) as run:
            vlm.model(**prefix, **compat.cache_kwargs(cache), use_cache=True, **vlm._keep_last())
        return run, cache, suffix

    @torch.no_grad()
    def share_prefix(self, batch: Batch, length: int, capture: Capture | None = None) -> shared.SharedPrefix:
        """Run the first ``length`` positions once; the result serves any number of suffix passes. Without autograd
        (attribution differentiates the suffix pass only): its keys and values are constants of every pass, and a
        graph would keep every layer's activations alive as long as the prefix."""
        family = self.vlm.family
        if not self.vlm._suffix_without_image:
            raise InterventionError(
                f"This {family.name} model's forward requires pixel_values, so no suffix runs without the image: "
                "run each condition in full (forward_conditions does so for it)."
            )
        if not 0 < length < batch.length or length < batch.end_of_images or length < family.causal_from(batch.inputs):
            raise InterventionError(
                f"A shared prefix of {length} positions must hold every example's whole images and leave a suffix "
                f"(images end at {batch.end_of_images - 1}, the batch has {batch.length} positions); "
                "batch examples whose images end at the same position (same prompt length), or one at a time."
            )
        reads = None if capture is None else self.vlm._plan(batch, capture=capture)
        run, cache, suffix = self.prefix_cache(batch, length, reads)
        return shared.SharedPrefix(
            batch, length, compat.cache_kv(cache, self.vlm.layers), suffix, run.record.captured, run.record.mixer_prefix
        )

    # --- suffix passes -----------------------------------------------------------------------
    def suffix_pass(self, prefix: shared.SharedPrefix, plan: Plan, n: int, keep: int = 1) -> tuple[torch.Tensor, Run]:
        """The suffix of ``n`` conditions (``plan`` over their n * B rows) in one pass: the logits of the last
        ``keep`` positions, [n * B, keep, V] (next-token logits [n * B, V] when ``keep`` is 1), and the run."""
        vlm = self.vlm
        record = Record(captured=shared.repeat_captured(prefix.captured, n))
        cache = compat.PrefixCache(vlm.n_layers, prefix.length, set(vlm.mixers))
        with vlm._running(replace(plan, prefix=prefix.kv, mixer_prefix=prefix.mixers or None), record) as run:
            out = vlm.model(
                **shared.repeat_rows(prefix.suffix, n),
                **compat.cache_kwargs(cache),
                use_cache=True,
                **vlm._keep_last(keep),
            )
        return (out.logits[:, -keep:].float() if keep > 1 else out.logits[:, -1].float()), run

    def pass_size(
        self,
        prefix: shared.SharedPrefix,
        *,
        keep: int = 1,
        probs: bool = False,
        zero_in_prefix: bool = False,
        knockouts: int = 1,
    ) -> int:
        """Conditions per suffix pass on ``prefix``: as many as the memory budget holds (`engine.budget`)."""
        b, vlm = prefix.batch, self.vlm
        keys = next(kv[0] for kv in prefix.kv if kv is not None)  # a hybrid decoder's recurrent layers hold none
        fused = budget.fused_prefix(
            keys.device,
            keys.dtype,
            probs=probs,
            zero_in_prefix=zero_in_prefix,
            grad=False,
            softcap=vlm.budget.shape.softcap,
        )
        return vlm.budget.conditions_per_pass(
            b.size, b.length, prefix.length, fused=fused, probs=probs, knockouts=knockouts, keep=keep
        )

    def suffix_passes(
        self, prefix: shared.SharedPrefix, plans: Plans, count: int, step: int, keep: int = 1
    ) -> Iterator[tuple[int, torch.Tensor, Run]]:
        """``count`` conditions on ``prefix``, stacked as batch rows, ``step`` per pass (`pass_size`). ``plans`` is
        their list, or a function (start, stop) -> the plans of those conditions, made pass by pass so a large scan
        never holds every condition's masks. Yields, per pass, how many conditions it held, its logits (as
        `suffix_pass`) and its run."""
        b = prefix.batch
        for s in range(0, count, step):
            part = plans[s : s + step] if isinstance(plans, list) else plans(s, min(count, s + step))
            logits, run = self.suffix_pass(prefix, shared.stack(part, b.size, b.length), len(part), keep)
            yield len(part), logits, run

    # --- several conditions ------------------------------------------------------------------
    def plans(
        self,
        batch: Batch,
        conds: list[shared.Condition],
        common: Iterable[Intervention] = (),
        capture: Capture | None = None,
        attention_stats: bool = False,
    ) -> list[Plan]:
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

    def prefix_length(self, batch: Batch, plans: list[Plan], keep: int = 1, generation: bool = False) -> int:
        """How many leading positions the plans share (`shared.prefix_length`). In generation on a hybrid decoder
        none: a recurrent layer's cached state cannot be cropped back to the prefix after a condition."""
        if generation and self.vlm.mixers:
            return 0
        return shared.prefix_length(batch, plans, keep=keep, causal_from=self.vlm._prefix_from(batch))

    def forward_conditions(
        self,
        batch: Batch,
        conditions: shared.Conditions,
        *,
        capture: Capture | None = None,
        attention_stats: bool = False,
        keep: int = 1,
        interventions: Iterable[Intervention] = (),
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
        prefix = shared.SharedPrefix(
            batch, P, compat.cache_kv(cache, vlm.layers), suffix, run.record.captured, run.record.mixer_prefix
        )
        kinds = {(k.layers, k.mode, k.source.generated, k.target.generated) for p in plans for k in p.knockouts}
        step = self.pass_size(
            prefix,
            keep=keep,
            probs="pattern" in plans[0].sites,
            zero_in_prefix=any(
                k.mode == "zero" and bool(k.source.prompt[:, :P].any()) for p in plans for k in p.knockouts
            ),
            knockouts=len(kinds) * max(len(p.knockouts) for p in plans),
        )
        B, done = batch.size, 0
        for n, logits, run in self.suffix_passes(prefix, plans, len(plans), step, keep):
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
        self,
        prefix: shared.SharedPrefix,
        sources: torch.Tensor,
        *,
        target: str | tuple = "text",
        layers: LayerWindow | list[LayerWindow] = None,
        mode: str = "mask",
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """See `VLM.forward_knockouts`."""
        vlm, batch = self.vlm, prefix.batch
        C, B = self.check_sources(batch, sources)
        per: list[LayerWindow]
        if isinstance(layers, list) and not all(isinstance(x, int) for x in layers):
            per = list(layers)
        else:
            per = [cast(LayerWindow, layers)] * C  # one window for every knockout (a list of ints is one)
        if len(per) != C:
            raise InterventionError(f"layers lists {len(per)} entries for {C} knockouts; give one per knockout.")
        windows: dict = {}  # one resolution (which validates target, layers and mode) per distinct window
        for l in per:
            key = _window(l)
            if key not in windows:
                windows[key] = vlm._plan(batch, knockouts=(Knockout("image", target, layers=key, mode=mode),))
        tgt = next(iter(windows.values())).knockouts[0].target
        if int(tgt.prompt.any(0).nonzero().min()) < prefix.length:
            raise InterventionError(f"Knockout target {target!r} starts inside the shared prefix; share a shorter one.")

        def plans(start: int, stop: int) -> list[Plan]:  # this pass's conditions only (``sources`` may be sparse)
            return [
                Plan(
                    vlm.layer_of,
                    vlm.n_layers,
                    (
                        ResolvedKnockout(
                            RoleMask(src.bool(), False), tgt, windows[_window(l)].knockouts[0].layers, mode
                        ),
                    ),
                )
                for src, l in zip(shared.dense_rows(sources, start, stop), per[start:stop])
            ]

        step = self.pass_size(prefix, zero_in_prefix=mode == "zero", knockouts=len(windows))
        out = []
        for n, logits, _ in self.suffix_passes(prefix, plans, C, step):
            logits = logits.cpu().view(n, B, -1)
            out.append(logits if reduce is None else reduce(logits))
        return torch.cat(out)

    # --- generation --------------------------------------------------------------------------
    def generate_conditions(
        self,
        batch: Batch,
        conditions: shared.Conditions,
        *,
        max_new_tokens: int = 20,
        interventions: Iterable[Intervention] = (),
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """See `VLM.generate_conditions`."""
        conds = shared.as_conditions(conditions)
        plans = self.plans(batch, conds, interventions)
        reads = [r.name for p in plans for r in p.edits if r.first_affected() is None or isinstance(r, ResolvedStats)]
        if reads:
            raise InterventionError(f"Generation takes no reads ({reads[0]}); read with forward or forward_conditions.")
        P = self.prefix_length(batch, plans, generation=True)
        return dict(zip((c.name for c in conds), self.generate_plans(batch, plans, P, max_new_tokens, kwargs)))

    def generate_knockouts(
        self,
        batch: Batch,
        sources: torch.Tensor,
        *,
        target: str | tuple = "text",
        mode: str = "mask",
        max_new_tokens: int = 20,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        """See `VLM.generate_knockouts`."""
        vlm = self.vlm
        self.check_sources(batch, sources)
        template = vlm._plan(batch, knockouts=(Knockout("image", target, mode=mode),))
        tgt = template.knockouts[0].target
        P = self.prefix_length(batch, [template], generation=True)
        plans = (  # made one at a time: ``sources`` may be sparse (a scan over thousands of positions)
            Plan(
                vlm.layer_of,
                vlm.n_layers,
                (ResolvedKnockout(RoleMask(shared.dense_rows(sources, c, c + 1)[0].bool(), False), tgt, None, mode),),
            )
            for c in range(sources.shape[0])
        )
        return self.generate_plans(batch, plans, P, max_new_tokens, kwargs)

    def generate_plans(
        self, batch: Batch, plans: Iterable[Plan], P: int, max_new_tokens: int, kwargs: dict
    ) -> list[torch.Tensor]:
        """Generate once per plan, the first ``P`` positions cached once with stock attention (P = 0: nothing
        shared, every plan reads the whole prompt)."""
        vlm = self.vlm
        if isinstance(plans, list):  # refused before anything runs; plans made one at a time are checked as they come
            for plan in plans:
                recurrent.refuse_generation(plan, vlm.mixers, vlm.family.name)
        inputs = vlm.model_inputs(batch)
        cache: Cache | None = None
        if P:
            _, cache, _ = self.prefix_cache(batch, P)
            inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        kwargs = vlm._gen_kwargs(kwargs)
        results = []
        for plan in plans:
            recurrent.refuse_generation(plan, vlm.mixers, vlm.family.name)
            try:
                with vlm._running(plan):
                    out = vlm.model.generate(
                        **inputs, **(compat.cache_kwargs(cache) if P else {}), max_new_tokens=max_new_tokens, **kwargs
                    )
            finally:
                if cache is not None:  # made when P > 0
                    shared.crop(cache, P)
            results.append(out.cpu())
        return results


def _window(layers: LayerWindow) -> tuple[int, ...] | None:
    """A knockout's layer window as a hashable key: None (every layer) or a tuple."""
    return None if layers is None else (layers,) if isinstance(layers, int) else tuple(layers)
