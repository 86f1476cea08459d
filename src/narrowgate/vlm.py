"""`VLM`: a Hugging Face vision-language model plus its processor, family adapter and engine."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field, replace

import torch
from PIL import Image
from transformers import DynamicCache

from . import compat
from .batch import Batch
from .engine import attention as engine_attention
from .engine import budget, hooks, shared
from .engine.interventions import Capture, Knockout
from .engine.state import (
    InterventionError,
    Plan,
    Record,
    ResolvedKnockout,
    RoleMask,
    Run,
    Scratch,
    activate,
    recompute_context,
    resolve,
)
from .engine.stats import CrossModalAttention, build
from .errors import parse_size
from .families import detect


@dataclass
class TrainingBatch:
    """A prompt batch with each example's answer appended (right-padded) and its loss labels.

    ``labels`` is [B, T]: the answer tokens (and the closing EOS) where the loss applies, -100
    elsewhere. ``batch``'s roles keep their prompt positions; ``text`` also covers the answer.
    ``answer_length`` is the width of the appended block (the loss needs only that many logits + 1).
    """

    batch: Batch
    labels: torch.Tensor
    answer_length: int


@dataclass
class Output:
    """Result of `VLM.forward`. ``residuals[role]`` is ``[B, len(capture_resids), D]`` (float32, CPU)."""

    logits: torch.Tensor
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)
    capture_resids: tuple[int, ...] = ()
    cross_modal_attention: CrossModalAttention | None = None


class VLM:
    """Wrap a model and processor already in memory (`narrowgate.load` builds one from a checkpoint).

    The wrapper switches the language model's attention to the engine's registered functions, installs
    the capture/patch hooks and puts the model in eval mode; `close` (or leaving a ``with VLM(...)``
    block) puts all three back, so a model handed to narrowgate is left as it was found.

    ``memory_budget``: the working memory (bytes beyond the weights) one model call may use; None (the default)
    means what a plain forward of the same batch needs. Every split of the work — conditions per suffix pass,
    query rows per attention block — is chosen to fit it (`narrowgate.engine.budget`); results do not depend on it.
    """

    def __init__(self, model, processor):
        self._was_training = model.training
        self._closed = False
        self.model = model.eval()
        self.processor = processor
        self.family = detect(model.config)(processor, model.config)
        self.family.attach(model)
        self.layers = self.family.decoder_layers(model)
        self.n_layers = len(self.layers)
        self.layer_of = {}
        for l, layer in enumerate(self.layers):
            attn = getattr(layer, "self_attn", None)
            if attn is None:
                raise InterventionError(f"Decoder layer {l} of this {self.family.name} model has no self_attn module.")
            self.layer_of[id(attn)] = l
        self._attn = self._wrap_attention()
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._hooks = hooks.install(self.layers)
        self.budget = budget.Budget(budget.Shape.of(model))

    @property
    def memory_budget(self) -> int | None:
        """Working memory one model call may use, in bytes (None: a plain forward's need)."""
        return self.budget.limit

    @memory_budget.setter
    def memory_budget(self, value) -> None:
        """Bytes, a size such as ``"8GiB"``, or None / ``"auto"`` for a plain forward's need."""
        self.budget = replace(self.budget, limit=parse_size(value, "memory_budget"))

    # --- set-up ------------------------------------------------------------------------------
    def _set_attention(self, implementation: str) -> None:
        config = self.model.config
        target = (
            {"text_config": implementation} if "text_config" in getattr(config, "sub_configs", {}) else implementation
        )
        self.model.set_attn_implementation(target)

    def _wrap_attention(self) -> str:
        """Switch the language model's attention to the engine's wrapper of the same kind (sdpa/eager).

        The implementation found first is kept on the decoder layers (shared by every `VLM` of the model)
        for `close` to restore.
        """
        attn = self.layers[0].self_attn
        current = attn.config._attn_implementation
        if not hasattr(self.layers, "_narrowgate_attention"):
            self.layers._narrowgate_attention = current
        if current in engine_attention.WRAPS.values():
            return current
        if current not in engine_attention.WRAPS:
            return current  # not wrapped: interventions will raise a clear error
        wanted = engine_attention.WRAPS[current]
        self._set_attention(wanted)
        got = attn.config._attn_implementation
        if got != wanted:
            raise InterventionError(
                f"Could not route {self.family.name}'s attention through narrowgate (it stays {got!r})."
            )
        return got

    def close(self) -> None:
        """Give the model back as it was found: the last `VLM` of a model removes the hooks and restores the
        attention implementation; this one restores the training mode it found. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if hooks.uninstall(self.layers):
            original = self.layers.__dict__.pop("_narrowgate_attention", None)
            if original is not None and original != self.layers[0].self_attn.config._attn_implementation:
                self._set_attention(original)
        self.model.train(self._was_training)

    def __enter__(self) -> VLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def attn_implementation(self) -> str:
        return self._attn

    @property
    def input_device(self) -> torch.device:
        weight = self.model.get_input_embeddings().weight
        return torch.device("cpu") if weight.device.type == "meta" else weight.device

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    # --- inputs ------------------------------------------------------------------------------
    def prepare(self, images, prompts, *, image_first: bool = True) -> Batch:
        """Tokenise one image + one prompt per example into a left-padded batch with role positions."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(prompts, str):
            prompts = [prompts]
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(
                f"prepare() got {len(images)} images but {len(prompts)} prompts; give one of each per example."
            )
        if not images:
            raise ValueError("prepare() needs at least one example.")
        images = [im.convert("RGB") if isinstance(im, Image.Image) else im for im in images]
        texts = [self.family.prompt(p, image_first) for p in prompts]
        inputs = self.family.encode(images, texts)
        ids = inputs["input_ids"]
        att = inputs.get("attention_mask")
        if att is None:
            att = torch.ones_like(ids)
        if bool((att[:, -1] == 0).any()):
            raise ValueError("The processor padded on the right; narrowgate needs left padding.")
        first = [int(torch.nonzero(att[b]).min()) for b in range(ids.shape[0])]
        layouts = []
        for b in range(ids.shape[0]):
            row = ids[b].tolist()
            lay = self.family.layout(row, first[b])
            self.family.check_layout(row, lay)
            layouts.append(lay)
        bos = getattr(self.family.tokenizer, "bos_token_id", None)
        return Batch(inputs=dict(inputs), layouts=layouts, first=first, bos_id=bos)

    def extend(self, batch: Batch, continuations: list[list[int]]) -> Batch:
        """``batch`` with token ids appended to each prompt (teacher forcing), left-padded again.

        Row ``b`` becomes its prompt followed by ``continuations[b]``; rows with shorter continuations
        get more left padding, so every row still ends at ``T' - 1``. Image inputs are unchanged and the
        layouts are located again in the new rows.
        """
        if len(continuations) != batch.size:
            raise ValueError(f"extend() got {len(continuations)} continuations for a batch of {batch.size}.")
        m = max(len(c) for c in continuations)
        ids = batch.input_ids
        pad = getattr(self.family.tokenizer, "pad_token_id", None) or 0
        inputs = {}
        for k, v in batch.inputs.items():
            if not (isinstance(v, torch.Tensor) and v.shape == ids.shape):
                inputs[k] = v
                continue
            rows = []
            for b, cont in enumerate(continuations):
                fill = pad if k == "input_ids" else 0
                tail = (
                    torch.tensor(cont, dtype=v.dtype)
                    if k == "input_ids"
                    else torch.full((len(cont),), 1 if k == "attention_mask" else 0, dtype=v.dtype)
                )
                rows.append(torch.cat([torch.full((m - len(cont),), fill, dtype=v.dtype), v[b], tail]))
            inputs[k] = torch.stack(rows)
        first = [f + m - len(c) for f, c in zip(batch.first, continuations)]
        layouts = []
        for b in range(batch.size):
            row = inputs["input_ids"][b].tolist()
            lay = self.family.layout(row, first[b])
            self.family.check_layout(row, lay)
            layouts.append(lay)
        return Batch(inputs=inputs, layouts=layouts, first=first, bos_id=batch.bos_id)

    def prepare_training(self, images, prompts, answers, *, image_first: bool = True) -> TrainingBatch:
        """`prepare` the prompts, then append each answer (a continuation of its prompt) and EOS.

        The answers are tokenised without special tokens and right-padded, so every prompt keeps
        the positions `prepare` gives it; other per-token inputs are extended with zeros.
        """
        if isinstance(answers, str):
            answers = [answers]
        answers = list(answers)
        batch = self.prepare(images, prompts, image_first=image_first)
        if len(answers) != batch.size:
            raise ValueError(f"prepare_training() got {batch.size} prompts but {len(answers)} answers.")
        tok = self.family.tokenizer
        if tok.eos_token_id is None:
            raise ValueError("The tokenizer has no EOS token to close the answers with.")
        rows = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers]
        A = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((batch.size, A), pad, dtype=batch.input_ids.dtype)
        mask = torch.zeros((batch.size, A), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        shape = batch.input_ids.shape
        inputs = {}
        for k, v in batch.inputs.items():
            if k == "input_ids":
                v = torch.cat([v, ids], 1)
            elif k == "attention_mask":
                v = torch.cat([v, mask.to(v.dtype)], 1)
            elif isinstance(v, torch.Tensor) and v.shape == shape and k != "pixel_values":
                v = torch.cat([v, v.new_zeros(shape[0], A)], 1)
            inputs[k] = v
        labels = torch.full((batch.size, shape[1] + A), -100, dtype=torch.long)
        labels[:, shape[1] :] = ids.masked_fill(mask == 0, -100)
        out = Batch(inputs=inputs, layouts=batch.layouts, first=batch.first, bos_id=batch.bos_id)
        return TrainingBatch(out, labels, A)

    def answer_logits(self, tb: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits [B, A, V] over the answer block and their labels [B, A] (-100: no loss).

        Asks the model for the last ``answer_length + 1`` positions' logits only, where it supports that.
        Call inside `intervening` for interventions; gradients flow unless the caller disables them.
        """
        keep = {"logits_to_keep": tb.answer_length + 1} if self._has_logits_to_keep else {}
        logits = self.model(**self.model_inputs(tb.batch), use_cache=False, **keep).logits
        labels = tb.labels[:, -logits.shape[1] :].to(logits.device)
        return logits[:, :-1], labels[:, 1:]

    def answer_loss(self, tb: TrainingBatch) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer tokens (see `answer_logits`)."""
        logits, labels = self.answer_logits(tb)
        wide = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
        return torch.nn.functional.cross_entropy(wide, labels.flatten(), ignore_index=-100)

    def model_inputs(self, batch: Batch) -> dict:
        """What the model is called with for ``batch``: its inputs on the model's device and dtype, plus the
        family's position ids (``model(**vlm.model_inputs(batch))`` is the stock forward)."""
        dev = self.input_device
        dtype = self.model.dtype
        out = {}
        for k, v in batch.inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(dev, dtype) if v.is_floating_point() else v.to(dev)
            out[k] = v
        pos = self.family.position_ids(out)
        if pos is not None:
            out["position_ids"] = pos
        return out

    # --- running -----------------------------------------------------------------------------
    def _plan(self, batch, knockouts, patches, capture, attention_stats) -> Plan:
        if self._closed:
            raise InterventionError("This VLM was closed (the model was given back); wrap the model again.")
        plan = resolve(
            batch,
            layer_of=self.layer_of,
            n_layers=self.n_layers,
            knockouts=knockouts,
            patches=patches,
            capture=capture,
            attention_stats=attention_stats,
        )
        if (plan.knockouts or attention_stats) and self._attn not in engine_attention.WRAPS.values():
            raise InterventionError(
                f"Knockouts and attention statistics need attn_implementation 'sdpa' or 'eager'; this model uses "
                f"{self._attn!r}. Load it with narrowgate.load(..., attn_implementation='sdpa')."
            )
        return plan

    @contextlib.contextmanager
    def _running(self, plan: Plan, record: Record | None = None):
        """The one way narrowgate runs the model: every model call (forward, prefix, suffix passes, generation,
        training) happens inside this block with ``plan`` active; on leaving it, the check that every
        intervention of the plan was applied. Yields the `Run` (its record holds what the call produced)."""
        run = Run(plan, record or Record(), Scratch(budget=self.budget))
        with activate(run):
            yield run
        run.check_applied()

    @contextlib.contextmanager
    def intervening(self, batch: Batch, *, knockouts=(), patches=()):
        """Knockouts and patches active, under autograd, for every model call inside the block.

        For training: the same attention functions and hooks as `forward`, with gradients and in
        training mode. ``backward()`` may run after the block; with gradient checkpointing, enable it
        through `enable_gradient_checkpointing` so the recompute sees the same interventions. On
        leaving the block the engine checks that every intervention was applied.
        """
        plan = self._plan(batch, knockouts, patches, None, False)
        if self.model.training:
            stale = [
                l
                for l, layer in enumerate(self.layers)
                if compat.checkpointing_context(layer) not in (False, recompute_context)
            ]
            if stale:
                raise InterventionError(
                    f"Gradient checkpointing is on in decoder layers {stale} without narrowgate's recompute context, "
                    "so the backward pass would recompute attention without the interventions. Enable it with "
                    "VLM.enable_gradient_checkpointing()."
                )
        with self._running(plan) as run:
            yield run

    def enable_gradient_checkpointing(self) -> None:
        """Non-reentrant gradient checkpointing whose recompute re-applies the interventions of its forward."""
        compat.enable_checkpointing(self.model, recompute_context)

    @torch.no_grad()
    def forward(
        self,
        batch: Batch,
        *,
        knockouts=(),
        patches=(),
        capture: Capture | None = None,
        attention_stats: bool = False,
    ) -> Output:
        """One forward pass with the given interventions; see `Knockout`, `Patch`, `Capture`."""
        plan = self._plan(batch, knockouts, patches, capture, attention_stats)
        with self._running(plan) as run:
            out = self.model(**self.model_inputs(batch), use_cache=False)
        cma = build(batch, run.record.column_attention, self.n_layers) if attention_stats else None
        return Output(
            logits=out.logits, residuals=run.residuals(), capture_resids=plan.capture_resids, cross_modal_attention=cma
        )

    @torch.no_grad()
    def generate(self, batch: Batch, *, knockouts=(), patches=(), max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """Greedy generation (unless ``kwargs`` say otherwise) with interventions on; token ids [B, T + new].

        With interventions, the prefix they cannot touch runs once with stock attention and only the
        rest through the engine (see `generate_conditions`); the result is the same.
        """
        if not knockouts and not patches:
            return self._generate_plans(batch, [self._plan(batch, (), (), None, False)], 0, max_new_tokens, kwargs)[0]
        cond = shared.Condition("generate", tuple(knockouts), tuple(patches))
        return self.generate_conditions(batch, [cond], max_new_tokens=max_new_tokens, **kwargs)["generate"]

    # --- several conditions, one shared prefix ---------------------------------------------------
    def _prefix_cache(self, batch: Batch, P: int, capture: Capture | None):
        """Run the shared prefix once (captures of prefix positions only); returns the run and the cache."""
        inputs = self.model_inputs(batch)
        prefix, suffix = shared.split_inputs(inputs, P)
        # A cache that keeps every position in every layer: the model's own would keep only the last window of a
        # sliding-window layer (Gemma 3, Cohere 2), and the suffix attends to the whole prefix through its mask.
        with self._running(self._plan(batch, (), (), capture, False)) as run:
            out = self.model(**prefix, **compat.cache_kwargs(DynamicCache()), use_cache=True, **self._keep_last())
        return run, compat.output_cache(out), suffix

    def _keep_last(self, keep: int = 1) -> dict:
        """Ask the model for the last ``keep`` positions' logits only, where its forward supports it."""
        return {"logits_to_keep": keep} if self._has_logits_to_keep else {}

    @staticmethod
    def _condition_output(logits, residuals, cma, keep: int) -> shared.ConditionOutput:
        tail = logits[:, -keep:].float().cpu() if keep > 1 else None
        return shared.ConditionOutput(logits[:, -1].float().cpu(), residuals, cma, tail)

    def _gen_kwargs(self, kwargs: dict) -> dict:
        """Greedy by default, padding with the tokenizer's pad token."""
        out = {"do_sample": False, **kwargs}
        pad = getattr(self.family.tokenizer, "pad_token_id", None)
        if pad is not None:
            out.setdefault("pad_token_id", pad)
        return out

    @torch.no_grad()
    def share_prefix(self, batch: Batch, length: int, capture: Capture | None = None) -> shared.SharedPrefix:
        """Run the first ``length`` positions once; the result serves any number of suffix passes. Without autograd
        (`attribute` differentiates the suffix pass only): its keys and values are constants of every pass, and a
        graph would keep every layer's activations alive as long as the prefix."""
        if (
            not 0 < length < batch.length
            or length <= max(lay.end for lay in batch.layouts)
            or length < self.family.causal_from(batch.inputs)
        ):
            raise InterventionError(
                f"A shared prefix of {length} positions must hold every example's whole image and leave a suffix "
                f"(images end at {max(lay.end for lay in batch.layouts)}, the batch has {batch.length} positions); "
                "batch examples whose images end at the same position (same prompt length), or one at a time."
            )
        pre_run, cache, suffix = self._prefix_cache(batch, length, capture)
        return shared.SharedPrefix(batch, length, compat.cache_kv(cache), suffix, pre_run.record.captured)

    def _suffix_pass(self, prefix: shared.SharedPrefix, plan: Plan, n: int, keep: int = 1) -> tuple[torch.Tensor, Run]:
        """The suffix of ``n`` conditions (``plan`` over their n * B rows) in one pass: the logits of the last
        ``keep`` positions, [n * B, keep, V] (next-token logits [n * B, V] when ``keep`` is 1), and the run."""
        record = Record(captured=shared.repeat_captured(prefix.captured, n))
        cache = compat.PrefixCache(self.n_layers, prefix.length)
        with self._running(replace(plan, prefix=prefix.kv), record) as run:
            out = self.model(
                **shared.repeat_rows(prefix.suffix, n),
                **compat.cache_kwargs(cache),
                use_cache=True,
                **self._keep_last(keep),
            )
        return (out.logits[:, -keep:].float() if keep > 1 else out.logits[:, -1].float()), run

    def _pass_size(self, prefix: shared.SharedPrefix, *, keep=1, probs=False, zero_in_prefix=False, knockouts=1) -> int:
        """Conditions per suffix pass on ``prefix``: as many as the memory budget holds (`engine.budget`)."""
        b, keys = prefix.batch, prefix.kv[0][0]
        fused = budget.fused_prefix(
            keys.device,
            keys.dtype,
            probs=probs,
            zero_in_prefix=zero_in_prefix,
            grad=False,
            softcap=self.budget.shape.softcap,
        )
        return self.budget.conditions_per_pass(
            b.size, b.length, prefix.length, fused=fused, probs=probs, knockouts=knockouts, keep=keep
        )

    def _suffix_passes(self, prefix: shared.SharedPrefix, plans, count: int, step: int, keep: int = 1):
        """``count`` conditions on ``prefix``, stacked as batch rows, ``step`` per pass (`_pass_size`). ``plans`` is
        their list, or a function (start, stop) -> the plans of those conditions, built pass by pass so a large
        scan never holds every condition's masks. Yields, per pass, how many conditions it held, its logits (as
        `_suffix_pass`) and its run."""
        b = prefix.batch
        for s in range(0, count, step):
            part = plans[s : s + step] if isinstance(plans, list) else plans(s, min(count, s + step))
            logits, run = self._suffix_pass(prefix, shared.stack(part, b.size, b.length), len(part), keep)
            yield len(part), logits, run

    @torch.no_grad()
    def forward_conditions(
        self,
        batch: Batch,
        conditions,
        *,
        capture: Capture | None = None,
        attention_stats: bool = False,
        keep: int = 1,
    ) -> dict[str, shared.ConditionOutput]:
        """Run several conditions (named knockout/patch sets) on one batch, sharing the unchanged prefix.

        Returns per condition the logits at the last position (and, with ``keep > 1``, those of the last
        ``keep`` positions), the captured residuals and, with ``attention_stats``, the cross-modal
        attention. The prefix runs once; the conditions' suffixes run together as batch rows, as many per
        pass as memory allows. Equal to separate `forward` calls.
        """
        conds = shared.as_conditions(conditions)
        keep = max(1, int(keep))
        P = shared.prefix_length(
            batch, conds, attention_stats=attention_stats, keep=keep, causal_from=self.family.causal_from(batch.inputs)
        )
        results = {}
        if P == 0:
            for c in conds:
                out = self.forward(
                    batch, knockouts=c.knockouts, patches=c.patches, capture=capture, attention_stats=attention_stats
                )
                results[c.name] = self._condition_output(out.logits, out.residuals, out.cross_modal_attention, keep)
            return results
        prefix = self.share_prefix(batch, P, capture)
        plans = [self._plan(batch, c.knockouts, c.patches, capture, attention_stats) for c in conds]
        kinds = {(k.layers, k.mode, k.source.generated, k.target.generated) for p in plans for k in p.knockouts}
        step = self._pass_size(
            prefix,
            keep=keep,
            probs=attention_stats,
            zero_in_prefix=any(
                k.mode == "zero" and bool(k.source.prompt[:, :P].any()) for p in plans for k in p.knockouts
            ),
            knockouts=len(kinds) * max(len(p.knockouts) for p in plans),
        )
        B, done = batch.size, 0
        for n, logits, run in self._suffix_passes(prefix, plans, len(plans), step, keep):
            part, done = conds[done : done + n], done + n
            logits = logits.cpu().view(n, B, *(() if keep == 1 else (keep,)), -1)
            residuals = {k: v.view(n, B, *v.shape[1:]) for k, v in run.residuals().items()}
            cols = {l: t.view(n, B, -1) for l, t in run.record.column_attention.items()}
            for i, c in enumerate(part):
                cma = build(batch, {l: t[i] for l, t in cols.items()}, self.n_layers) if attention_stats else None
                last, tail = (logits[i], None) if keep == 1 else (logits[i][:, -1], logits[i])
                results[c.name] = shared.ConditionOutput(last, {k: v[i] for k, v in residuals.items()}, cma, tail)
        return results

    @staticmethod
    def _check_sources(batch: Batch, sources: torch.Tensor) -> tuple[int, int]:
        """Refuse knockout sources not shaped [C, B, T] for ``batch``; returns (C, B)."""
        if sources.dim() != 3 or tuple(sources.shape[1:]) != (batch.size, batch.length):
            raise InterventionError(
                f"sources must be [C, {batch.size}, {batch.length}] for this batch, got {tuple(sources.shape)}."
            )
        return sources.shape[0], sources.shape[1]

    @torch.no_grad()
    def forward_knockouts(
        self,
        prefix: shared.SharedPrefix,
        sources: torch.Tensor,
        *,
        target="text",
        layers=None,
        mode: str = "mask",
        reduce=None,
    ) -> torch.Tensor:
        """Next-token logits at ``last`` ([C, B, V], float32, CPU) for C knockouts ``sources[c] -> target``.

        ``sources`` is a [C, B, T] boolean mask of arbitrary key positions (one position, a set, the whole
        image), so a scan over every image-side position is one call; dense, or sparse COO
        (``torch.sparse_coo_tensor``), which a scan over thousands of positions should use: each pass then makes
        only its own conditions' masks. ``layers``: decoder layers of every knockout (None = all), or a list of C
        such windows (tuples, ranges or None), one per knockout. The knockouts run as batch rows of suffix passes
        on ``prefix`` (`share_prefix`), as many per pass as the memory budget holds. ``reduce`` maps each pass's
        logits [n, B, V] to what is kept of them (a divergence per condition, say), so C x V logits are never
        held; the result is then the concatenation of its outputs.
        """
        batch = prefix.batch
        C, B = self._check_sources(batch, sources)
        each = isinstance(layers, list) and not all(isinstance(x, int) for x in layers)
        per = list(layers) if each else [layers] * C
        if len(per) != C:
            raise InterventionError(f"layers lists {len(per)} entries for {C} knockouts; give one per knockout.")
        windows: dict = {}
        for l in per:  # validates target, layers and mode, once per window
            key = None if l is None else tuple(l)
            if key not in windows:
                windows[key] = self._plan(batch, (Knockout("image", target, layers=l, mode=mode),), (), None, False)
        tgt = next(iter(windows.values())).knockouts[0].target
        if int(tgt.prompt.any(0).nonzero().min()) < prefix.length:
            raise InterventionError(f"Knockout target {target!r} starts inside the shared prefix; share a shorter one.")

        def plans(start: int, stop: int) -> list[Plan]:
            part = shared.dense_rows(sources, start, stop)
            return [
                Plan(
                    self.layer_of,
                    self.n_layers,
                    (ResolvedKnockout(RoleMask(src.bool(), False), tgt, windows[key].knockouts[0].layers, mode),),
                )
                for src, key in zip(part, (None if l is None else tuple(l) for l in per[start:stop]))
            ]

        step = self._pass_size(prefix, zero_in_prefix=mode == "zero", knockouts=len(windows))
        out = []
        for n, logits, _ in self._suffix_passes(prefix, plans, C, step):
            logits = logits.cpu().view(n, B, -1)
            out.append(logits if reduce is None else reduce(logits))
        return torch.cat(out)

    def attribute(
        self, prefix: shared.SharedPrefix, *, target="text", mode: str = "mask"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """First-order estimate, for every key position j, of knocking out ``j -> target`` at every layer.

        One suffix pass with autograd and one backward (attribution patching on the attention edges): with
        A the attention probabilities of the target rows and G = dM/dA, where M is the log-probability at
        ``last`` of the model's own next token, the knockout changes row i by dA (``mask``: A_ij -> 0 and the
        rest renormalised, dA_ik = A_ik A_ij / (1 - A_ij); ``zero``: A_ij -> 0), and the estimate is
        sum over layers, heads and target rows of <G_i, dA_i>. Returns the estimated change of M
        ([B, T], float32, CPU; negative = the knockout lowers it) and the next tokens ([B]).
        """
        if mode not in ("mask", "zero"):
            raise ValueError(f"mode must be 'mask' or 'zero', got {mode!r}.")
        batch, P = prefix.batch, prefix.length
        rows = self._plan(batch, (Knockout("image", target),), (), None, False).knockouts[0].target.prompt[:, P:]
        with torch.enable_grad():
            logits, run = self._suffix_pass(prefix, Plan(self.layer_of, self.n_layers, record_probs=True), 1)
            probs = run.record.probs
            top = logits.argmax(-1)
            metric = torch.log_softmax(logits, -1).gather(1, top[:, None]).sum()
            layers = sorted(probs)
            grads = torch.autograd.grad(metric, [probs[l] for l in layers])
        est = torch.zeros(batch.size, batch.length)
        sel = rows.to(grads[0].device)[:, None, :, None].float()  # [B, 1, Q, 1]
        for l, G in zip(layers, grads):
            A = probs[l].detach()
            if mode == "zero":
                edge = -A * G
            else:
                S = (A * G).sum(-1, keepdim=True)
                edge = A / (1 - A).clamp(min=torch.finfo(A.dtype).tiny) * (S - G)
            est += (edge * sel).sum((1, 2)).cpu()
        return est, top.cpu()

    @torch.no_grad()
    def generate_conditions(
        self, batch: Batch, conditions, *, max_new_tokens: int = 20, **kwargs
    ) -> dict[str, torch.Tensor]:
        """Greedy generation for several conditions, sharing the unchanged prefix; token ids [B, T + new] each."""
        conds = shared.as_conditions(conditions)
        P = shared.prefix_length(batch, conds, attention_stats=False, causal_from=self.family.causal_from(batch.inputs))
        plans = [self._plan(batch, c.knockouts, c.patches, None, False) for c in conds]
        return dict(zip((c.name for c in conds), self._generate_plans(batch, plans, P, max_new_tokens, kwargs)))

    @torch.no_grad()
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
        """Greedy generation under C knockouts ``sources[c] -> target`` at every layer; token ids [B, T + new] each.

        ``sources`` is a [C, B, T] boolean mask of arbitrary key positions, dense or sparse, as in
        `forward_knockouts` (the gate scan's single positions); the prompt up to the first target position runs
        once and is shared.
        """
        self._check_sources(batch, sources)
        template = Knockout("image", target, mode=mode)
        tgt = self._plan(batch, (template,), (), None, False).knockouts[0].target
        P = shared.prefix_length(
            batch,
            [shared.Condition("k", knockouts=(template,))],
            attention_stats=False,
            causal_from=self.family.causal_from(batch.inputs),
        )
        plans = (  # made one at a time: ``sources`` may be sparse (a scan over thousands of positions)
            Plan(
                self.layer_of,
                self.n_layers,
                (ResolvedKnockout(RoleMask(shared.dense_rows(sources, c, c + 1)[0].bool(), False), tgt, None, mode),),
            )
            for c in range(sources.shape[0])
        )
        return self._generate_plans(batch, plans, P, max_new_tokens, kwargs)

    def _generate_plans(self, batch: Batch, plans, P: int, max_new_tokens: int, kwargs: dict) -> list[torch.Tensor]:
        """Generate once per plan, the first ``P`` positions cached once with stock attention (P = 0: nothing
        shared, every plan reads the whole prompt)."""
        inputs = self.model_inputs(batch)
        cache = None
        if P:
            _, cache, _ = self._prefix_cache(batch, P, None)
            inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        kwargs = self._gen_kwargs(kwargs)
        results = []
        for plan in plans:
            try:
                with self._running(plan):
                    out = self.model.generate(
                        **inputs, **(compat.cache_kwargs(cache) if P else {}), max_new_tokens=max_new_tokens, **kwargs
                    )
            finally:
                if P:
                    shared.crop(cache, P)
            results.append(out.cpu())
        return results

    def decode(self, tokens: torch.Tensor, batch: Batch) -> list[str]:
        """Decode the generated part of ``generate``'s output."""
        return self.family.tokenizer.batch_decode(tokens[:, batch.length :], skip_special_tokens=True)
