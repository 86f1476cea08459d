"""`VLM`: a Hugging Face vision-language model plus its processor, family adapter and engine."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from PIL import Image

from . import compat
from .batch import Batch
from .engine import attention as engine_attention
from .engine import hooks
from .engine import shared
from .engine.interventions import Capture
from .engine.state import InterventionError, activate, recompute_context, resolve
from .engine.stats import CrossModalAttention, build
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
    """Result of `VLM.forward`. ``residuals[role]`` is ``[B, len(capture_layers), D]`` (float32, CPU)."""

    logits: torch.Tensor
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)
    capture_layers: tuple[int, ...] = ()
    cross_modal_attention: CrossModalAttention | None = None


class VLM:
    """Wrap a model and processor already in memory (`narrowgate.load` builds one from a checkpoint)."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor
        self.family = detect(model.config)(processor, model.config)
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

    # --- set-up ------------------------------------------------------------------------------
    def _wrap_attention(self) -> str:
        """Switch the language model's attention to the engine's wrapper of the same kind (sdpa/eager)."""
        attn = self.layers[0].self_attn
        current = attn.config._attn_implementation
        if current in engine_attention.WRAPS.values():
            return current
        if current not in engine_attention.WRAPS:
            return current  # not wrapped: interventions will raise a clear error
        wanted = engine_attention.WRAPS[current]
        config = self.model.config
        target = {"text_config": wanted} if "text_config" in getattr(config, "sub_configs", {}) else wanted
        self.model.set_attn_implementation(target)
        got = attn.config._attn_implementation
        if got != wanted:
            raise InterventionError(
                f"Could not route {self.family.name}'s attention through narrowgate (it stays {got!r})."
            )
        return got

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
            raise ValueError(f"prepare() got {len(images)} images but {len(prompts)} prompts; give one of each per example.")
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
        return Batch(inputs=dict(inputs), layouts=layouts, first=first, bos_id=bos, image_first=image_first)

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
        out = Batch(inputs=inputs, layouts=batch.layouts, first=batch.first, bos_id=batch.bos_id,
                    image_first=batch.image_first)
        return TrainingBatch(out, labels, A)

    def answer_logits(self, tb: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits [B, A, V] over the answer block and their labels [B, A] (-100: no loss).

        Asks the model for the last ``answer_length + 1`` positions' logits only, where it supports that.
        Call inside `intervening` for interventions; gradients flow unless the caller disables them.
        """
        keep = {"logits_to_keep": tb.answer_length + 1} if self._has_logits_to_keep else {}
        logits = self.model(**self._inputs(tb.batch), use_cache=False, **keep).logits
        labels = tb.labels[:, -logits.shape[1] :].to(logits.device)
        return logits[:, :-1], labels[:, 1:]

    def answer_loss(self, tb: TrainingBatch) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer tokens (see `answer_logits`)."""
        logits, labels = self.answer_logits(tb)
        wide = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
        return torch.nn.functional.cross_entropy(wide, labels.flatten(), ignore_index=-100)

    def _inputs(self, batch: Batch) -> dict:
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
    def _run(self, batch, knockouts, patches, capture, attention_stats):
        run = resolve(
            batch,
            layer_of=self.layer_of,
            n_layers=self.n_layers,
            knockouts=knockouts,
            patches=patches,
            capture=capture,
            attention_stats=attention_stats,
        )
        if (run.knockouts or attention_stats) and self._attn not in engine_attention.WRAPS.values():
            raise InterventionError(
                f"Knockouts and attention statistics need attn_implementation 'sdpa' or 'eager'; this model uses "
                f"{self._attn!r}. Load it with narrowgate.load(..., attn_implementation='sdpa')."
            )
        return run

    @staticmethod
    def _check_applied(run) -> None:
        needed = set()
        for k in run.knockouts:
            needed |= set(range(run.n_layers)) if k.layers is None else set(k.layers)
        if run.text is not None:
            needed |= set(range(run.n_layers))
        missed = sorted(needed - run.attention_calls)
        if missed:
            raise InterventionError(
                f"The engine's attention never ran in decoder layers {missed}: the intervention did not apply. "
                "The model's attention implementation bypasses narrowgate."
            )
        unapplied = [i for i in range(len(run.patches)) if i not in run.patched]
        if unapplied:
            raise InterventionError(f"Patches {unapplied} were never applied during the forward pass.")

    @contextlib.contextmanager
    def intervening(self, batch: Batch, *, knockouts=(), patches=()):
        """Knockouts and patches active, under autograd, for every model call inside the block.

        For training: the same attention functions and hooks as `forward`, with gradients and in
        training mode. ``backward()`` may run after the block; with gradient checkpointing, enable it
        through `enable_gradient_checkpointing` so the recompute sees the same interventions. On
        leaving the block the engine checks that every intervention was applied.
        """
        run = self._run(batch, knockouts, patches, None, False)
        if self.model.training:
            stale = [l for l, layer in enumerate(self.layers)
                     if compat.checkpointing_context(layer) not in (False, recompute_context)]
            if stale:
                raise InterventionError(
                    f"Gradient checkpointing is on in decoder layers {stale} without narrowgate's recompute context, "
                    "so the backward pass would recompute attention without the interventions. Enable it with "
                    "VLM.enable_gradient_checkpointing()."
                )
        with activate(run):
            yield run
        self._check_applied(run)

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
        run = self._run(batch, knockouts, patches, capture, attention_stats)
        with activate(run):
            out = self.model(**self._inputs(batch), use_cache=False)
        self._check_applied(run)
        residuals = run.residuals()
        cma = build(batch, run.column_attention, self.n_layers) if attention_stats else None
        return Output(
            logits=out.logits, residuals=residuals, capture_layers=run.capture_layers, cross_modal_attention=cma
        )

    @torch.no_grad()
    def generate(self, batch: Batch, *, knockouts=(), patches=(), max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """Greedy generation (unless ``kwargs`` say otherwise) with interventions on; token ids [B, T + new].

        With interventions, the prefix they cannot touch runs once with stock attention and only the
        rest through the engine (see `generate_conditions`); the result is the same.
        """
        if not knockouts and not patches:
            return self._generate(batch, (), (), max_new_tokens, kwargs)
        cond = shared.Condition("generate", tuple(knockouts), tuple(patches))
        return self.generate_conditions(batch, [cond], max_new_tokens=max_new_tokens, **kwargs)["generate"]

    def _generate(self, batch: Batch, knockouts, patches, max_new_tokens: int, kwargs: dict) -> torch.Tensor:
        """Generation over the whole prompt with the interventions active throughout."""
        run = self._run(batch, knockouts, patches, None, False)
        with activate(run):
            out = self.model.generate(**self._inputs(batch), max_new_tokens=max_new_tokens, **self._gen_kwargs(kwargs))
        self._check_applied(run)
        return out.cpu()

    # --- several conditions, one shared prefix ---------------------------------------------------
    def _prefix_cache(self, batch: Batch, P: int, capture: Capture | None):
        """Run the shared prefix once (captures of prefix positions only); returns the run and the cache."""
        inputs = self._inputs(batch)
        prefix, suffix = shared.split_inputs(inputs, P)
        run = self._run(batch, (), (), capture, False)
        with activate(run):
            out = self.model(**prefix, use_cache=True, **self._keep_last())
        return run, compat.output_cache(out), suffix

    def _keep_last(self) -> dict:
        """Ask the model for the last position's logits only, where its forward supports it."""
        return {"logits_to_keep": 1} if self._has_logits_to_keep else {}

    def _gen_kwargs(self, kwargs: dict) -> dict:
        """Greedy by default, padding with the tokenizer's pad token."""
        out = {"do_sample": False, **kwargs}
        pad = getattr(self.family.tokenizer, "pad_token_id", None)
        if pad is not None:
            out.setdefault("pad_token_id", pad)
        return out

    @torch.no_grad()
    def forward_conditions(
        self, batch: Batch, conditions, *, capture: Capture | None = None, attention_stats: bool = False
    ) -> dict[str, shared.ConditionOutput]:
        """Run several conditions (named knockout/patch sets) on one batch, sharing the unchanged prefix.

        Returns per condition the logits at the last position, the captured residuals and, with
        ``attention_stats``, the cross-modal attention. Equal to separate `forward` calls.
        """
        conds = shared.as_conditions(conditions)
        P = shared.prefix_length(batch, conds, attention_stats=attention_stats)
        results = {}
        if P == 0:
            for c in conds:
                out = self.forward(
                    batch, knockouts=c.knockouts, patches=c.patches, capture=capture, attention_stats=attention_stats
                )
                results[c.name] = shared.ConditionOutput(
                    out.logits[:, -1].float().cpu(), out.residuals, out.cross_modal_attention
                )
            return results
        pre_run, cache, suffix = self._prefix_cache(batch, P, capture)
        for c in conds:
            run = self._run(batch, c.knockouts, c.patches, capture, attention_stats)
            for name, per_layer in pre_run.captured.items():
                run.captured[name] = dict(per_layer)
            try:
                with activate(run):
                    out = self.model(**suffix, **compat.cache_kwargs(cache), use_cache=True, **self._keep_last())
            finally:
                shared.crop(cache, P)
            self._check_applied(run)
            cma = build(batch, run.column_attention, self.n_layers) if attention_stats else None
            results[c.name] = shared.ConditionOutput(out.logits[:, -1].float().cpu(), run.residuals(), cma)
        return results

    @torch.no_grad()
    def generate_conditions(self, batch: Batch, conditions, *, max_new_tokens: int = 20, **kwargs) -> dict[str, torch.Tensor]:
        """Greedy generation for several conditions, sharing the unchanged prefix; token ids [B, T + new] each."""
        conds = shared.as_conditions(conditions)
        P = shared.prefix_length(batch, conds, attention_stats=False)
        if P == 0:
            return {c.name: self._generate(batch, c.knockouts, c.patches, max_new_tokens, kwargs) for c in conds}
        _, cache, _ = self._prefix_cache(batch, P, None)
        inputs = self._inputs(batch)
        inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        kwargs = self._gen_kwargs(kwargs)
        results = {}
        for c in conds:
            run = self._run(batch, c.knockouts, c.patches, None, False)
            try:
                with activate(run):
                    out = self.model.generate(
                        **inputs, **compat.cache_kwargs(cache), max_new_tokens=max_new_tokens, **kwargs
                    )
            finally:
                shared.crop(cache, P)
            self._check_applied(run)
            results[c.name] = out.cpu()
        return results

    def decode(self, tokens: torch.Tensor, batch: Batch) -> list[str]:
        """Decode the generated part of ``generate``'s output."""
        return self.family.tokenizer.batch_decode(tokens[:, batch.length :], skip_special_tokens=True)
