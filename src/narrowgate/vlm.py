"""`VLM`: a Hugging Face vision-language model plus its processor, family adapter and engine.

`VLM` loads nothing itself (`narrowgate.load` does), encodes prompts into batches with roles, runs one model
call under a plan of interventions (`forward`, `generate`, `intervening`) and gives the model back (`close`).
Shared-prefix scheduling lives in `engine.runner`, attribution in `engine.attribution`, the training helpers
in `narrowgate.training`; the methods of the same names here delegate to them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from . import compat, training
from .batch import Batch
from .engine import attention as engine_attention
from .engine import attribution, budget, hooks, recurrent, shared
from .engine.interventions import Capture, ResolvedStats
from .engine.protocol import ModelShape
from .engine.runner import Runner
from .engine.state import InterventionError, Plan, Record, Run, Scratch, activate, recompute_context, resolve
from .engine.stats import CrossModalAttention, build
from .errors import PromptError
from .families import detect
from .families.base import Item
from .parsing import parse_size
from .training import TrainingBatch
from .video import Video

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .checkpoint_prompts import CheckpointPrompts
    from .engine.interventions import Knockout, Patch
    from .engine.protocol import Intervention
    from .engine.runner import LayerWindow
    from .families.base import Processor

#: One image or video of an example, or all of an example's in prompt order.
Visual = Image.Image | Video
Visuals = Visual | Sequence[Visual | Sequence[Visual]]

__all__ = ["VLM", "Output", "TrainingBatch"]


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
    the site hooks and puts the model in eval mode; `close` (or leaving a ``with VLM(...)`` block) puts all
    three back and restores the tokenizer's padding side, so a model handed to narrowgate is left as it was
    found.
    ``checkpoint_prompts``: the prompts the checkpoint says it answers (its ``narrowgate.json``, set by
    `narrowgate.load`; None when it has none or the model came from elsewhere).
    ``memory_budget``: the working memory (bytes beyond the weights) one model call may use; None (the default)
    means what a plain forward of the same batch needs. Every split of the work — conditions per suffix pass,
    query rows per attention block — is chosen to fit it (`narrowgate.engine.budget`); results do not depend on it.

    On a hybrid decoder (Qwen 3.5's Gated DeltaNet layers beside attention) ``mixers`` maps each recurrent decoder
    layer to its kind and module, and ``attention_layers`` lists the others; knockouts reach through both kinds
    (docs/hybrid-decoders.md).
    """

    def __init__(
        self, model: PreTrainedModel, processor: Processor, checkpoint_prompts: CheckpointPrompts | None = None
    ) -> None:
        self.checkpoint_prompts = checkpoint_prompts
        self._was_training = model.training
        self._closed = False
        self.model = model.eval()
        self.processor = processor
        self.family = detect(model.config)(processor, model.config)
        self.family.attach(model)
        self.layers = self.family.decoder_layers(model)
        self.n_layers = len(self.layers)
        self.layer_of: dict[int, int] = {}
        self.mixers: dict[int, tuple] = {}  # recurrent layers of a hybrid decoder: (kind, module)
        modules = []
        for l, layer in enumerate(self.layers):
            attn = getattr(layer, "self_attn", None)
            if attn is None:
                found = recurrent.find(layer)
                if found is None:
                    raise InterventionError(
                        f"Decoder layer {l} of this {self.family.name} model ({recurrent.describe(layer)}) has neither "
                        "self-attention nor a recurrent mixer narrowgate knocks out through (it knows "
                        f"{', '.join(k.name for k in recurrent.KINDS)})."
                    )
                self.mixers[l] = found
                attn = found[1]
            else:
                self.layer_of[id(attn)] = l
            modules.append((attn, getattr(layer, "mlp", None)))
        self.attention_layers = [l for l in range(self.n_layers) if l not in self.mixers]
        if not self.attention_layers:
            raise InterventionError(
                f"This {self.family.name} model has no self-attention layer for narrowgate to wrap."
            )
        # a transformers attention module: its config and head_dim are read by name
        self._attention: Any = self.layers[self.attention_layers[0]].self_attn
        self._has_mlp = all(m is not None for _, m in modules)
        tok = self.family.tokenizer
        if not hasattr(self.layers, "_narrowgate_padding"):
            setattr(self.layers, "_narrowgate_padding", (tok, getattr(tok, "padding_side", None)))
        self._attn = self._wrap_attention()
        params = inspect.signature(model.forward).parameters
        self._has_logits_to_keep = "logits_to_keep" in params
        # A forward that cannot run without the image (BLIP-2's requires pixel_values) has no suffix pass.
        pixels = params.get("pixel_values")
        self._suffix_without_image = pixels is None or pixels.default is not inspect.Parameter.empty
        self._hooks = hooks.install(
            self.layers, modules, {l: recurrent.hook(kind, l) for l, (kind, _) in self.mixers.items()}
        )
        self.runner = Runner(self)
        self.budget = budget.Budget(budget.Shape.of(model))

    @property
    def memory_budget(self) -> int | None:
        """Working memory one model call may use, in bytes (None: a plain forward's need)."""
        return self.budget.limit

    @memory_budget.setter
    def memory_budget(self, value: int | str | None) -> None:
        """Bytes, a size such as ``"8GiB"``, or None / ``"auto"`` for a plain forward's need."""
        self.budget = replace(self.budget, limit=parse_size(value, "memory_budget"))

    # --- set-up ------------------------------------------------------------------------------
    def _set_attention(self, implementation: str) -> None:
        config = self.model.config
        target = (
            {"text_config": implementation} if "text_config" in getattr(config, "sub_configs", {}) else implementation
        )
        self.model.set_attn_implementation(target)

    def _wrap_attention(self) -> str | None:
        """Switch the language model's attention to the engine's wrapper of the same kind (sdpa/eager).

        The implementation found first is kept on the decoder layers (shared by every `VLM` of the model)
        for `close` to restore.
        """
        attn = self._attention
        current = compat.attn_implementation(attn.config)
        if not hasattr(self.layers, "_narrowgate_attention"):
            setattr(self.layers, "_narrowgate_attention", current)
        if current in engine_attention.WRAPS.values():
            return current
        if current not in engine_attention.WRAPS:
            return current  # not wrapped: interventions will raise a clear error
        wanted = engine_attention.WRAPS[current]
        self._set_attention(wanted)
        got = compat.attn_implementation(attn.config)
        if got != wanted:
            raise InterventionError(
                f"Could not route {self.family.name}'s attention through narrowgate (it stays {got!r})."
            )
        return got

    def close(self) -> None:
        """Give the model back as it was found: the last `VLM` of a model removes the hooks and restores the
        attention implementation and the tokenizer's padding side; this one restores the training mode it found.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if hooks.uninstall(self.layers):
            original = self.layers.__dict__.pop("_narrowgate_attention", None)
            if original is not None and original != compat.attn_implementation(self._attention.config):
                self._set_attention(original)
            tok, side = self.layers.__dict__.pop("_narrowgate_padding", (None, None))
            if tok is not None and side is not None:
                tok.padding_side = side
        self.model.train(self._was_training)

    def __enter__(self) -> VLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def attn_implementation(self) -> str | None:
        """The model's own attention implementation (``sdpa`` or ``eager``), which the engine wraps."""
        return self._attn

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the CPU when they are offloaded)."""
        weight = self.model.get_input_embeddings().weight
        return torch.device("cpu") if weight.device.type == "meta" else weight.device

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream (D): the text decoder's ``hidden_size``. (The model's input embeddings are
        not always the decoder's: BLIP-2's `get_input_embeddings` finds a 768-wide one beside a 64-wide decoder.)"""
        width = getattr(self.model.config.get_text_config(), "hidden_size", None)
        return int(width) if width else int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def shape(self) -> ModelShape:
        """The sizes an intervention may check or build values for (`Intervention.resolve`)."""
        attn = self._attention
        heads = self._heads()
        head_dim = int(getattr(attn, "head_dim", 0) or self.hidden_size // heads)
        return ModelShape(self.n_layers, self.hidden_size, heads, head_dim)

    def _heads(self) -> int:
        return int(self._attention.config.num_attention_heads)

    # --- inputs ------------------------------------------------------------------------------
    def prepare(self, images: Visuals, prompts: str | Sequence[str], *, image_first: bool = True) -> Batch:
        """Tokenise one prompt per example, with its image(s), into a left-padded batch with role positions.

        ``images[b]`` is example ``b``'s image, or the list of its images and videos (`narrowgate.Video`) in the
        order the prompt shows them (all before the text, or all after it with ``image_first=False``). With
        several, roles name each one's positions (``eoi@1``, ``image@2``, ``frame@t``: docs/concepts.md)."""
        if isinstance(images, (Image.Image, Video)):
            images = [images]
        if isinstance(prompts, str):
            prompts = [prompts]
        examples = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
        prompts = list(prompts)
        if len(examples) != len(prompts):
            raise ValueError(
                f"prepare() got {len(examples)} images but {len(prompts)} prompts; give one of each per example "
                "(several images in one prompt: a list per example, [[image_1, image_2]])."
            )
        if not examples:
            raise ValueError("prepare() needs at least one example.")
        if not all(examples):
            raise ValueError("prepare() got an example with no image; give each example at least one.")
        for p in prompts:
            self._check_text(p)
        examples = [[x.convert("RGB") if isinstance(x, Image.Image) else x for x in ex] for ex in examples]
        kinds = [tuple("video" if isinstance(x, Video) else "image" for x in ex) for ex in examples]
        texts = [self.family.prompt(p, image_first, k) for p, k in zip(prompts, kinds)]
        if all(k == ("image",) for k in kinds):
            inputs = self.family.encode([ex[0] for ex in examples], texts)
        else:
            stills = [[x for x in ex if not isinstance(x, Video)] for ex in examples]
            videos = [x.array for ex in examples for x in ex if isinstance(x, Video)]
            inputs = self.family.encode(stills, texts, videos or None)
        ids = inputs["input_ids"]
        att = inputs.get("attention_mask")
        if att is None:
            att = torch.ones_like(ids)
        if bool((att[:, -1] == 0).any()):
            raise ValueError("The processor padded on the right; narrowgate needs left padding.")
        first = [int(torch.nonzero(att[b]).min()) for b in range(ids.shape[0])]
        counts = {"image": 0, "video": 0}
        layouts: list = []
        for b in range(ids.shape[0]):
            items = []
            for kind in kinds[b]:
                items.append(Item(kind, counts[kind]))
                counts[kind] += 1
            lays = self.family.layouts(ids[b].tolist(), first[b], items, inputs)
            layouts.append(lays[0] if len(lays) == 1 else lays)
        bos = getattr(self.family.tokenizer, "bos_token_id", None)
        return Batch(inputs=dict(inputs), layouts=layouts, first=first, bos_id=bos)

    def _check_text(self, text: str) -> None:
        """Refuse a prompt holding an image token (``<image>``...): the processor would count it as an image."""
        fam = self.family
        image_ids = (
            fam.content_ids | fam.special_ids | fam.eol_ids | {i for i in (fam.boi_id, fam.eoi_id) if i is not None}
        )
        found = [i for i in fam.tokenizer(text, add_special_tokens=False)["input_ids"] if i in image_ids]
        if found:
            token = fam.tokenizer.convert_ids_to_tokens(found[0])
            raise PromptError(
                f"The prompt {text[:60]!r} holds {token!r}, an image token of this {fam.name} model: narrowgate "
                "places the one image itself. Remove it from the prompt."
            )

    def extend(self, batch: Batch, continuations: list[list[int]]) -> Batch:
        """``batch`` with token ids appended to each prompt (teacher forcing), left-padded again.

        Row ``b`` becomes its prompt followed by ``continuations[b]``; rows with shorter continuations
        get more left padding, so every row still ends at ``T' - 1``. Image inputs are unchanged and the
        layouts move with the padding.
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
        shift = [m - len(c) for c in continuations]
        first = [f + d for f, d in zip(batch.first, shift)]
        layouts: list = []
        for b, d in enumerate(shift):
            moved = [lay.shifted(d) for lay in batch.visuals(b)]
            layouts.append(moved[0] if len(moved) == 1 else moved)
        return Batch(inputs=inputs, layouts=layouts, first=first, bos_id=batch.bos_id)

    def prepare_training(
        self,
        images: Visuals,
        prompts: str | Sequence[str],
        answers: str | Sequence[str],
        *,
        image_first: bool = True,
    ) -> TrainingBatch:
        """`narrowgate.training.prepare_training`: the prompts with their answers appended, and the loss labels."""
        return training.prepare_training(self, images, prompts, answers, image_first=image_first)

    def answer_logits(self, tb: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """`narrowgate.training.answer_logits`: next-token logits over the answer block and their labels."""
        return training.answer_logits(self, tb)

    def answer_loss(self, tb: TrainingBatch) -> torch.Tensor:
        """`narrowgate.training.answer_loss`: mean next-token cross-entropy over the answer tokens."""
        return training.answer_loss(self, tb)

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

    def decode(self, tokens: torch.Tensor, batch: Batch) -> list[str]:
        """Decode the generated part of ``generate``'s output."""
        return self.family.tokenizer.batch_decode(tokens[:, batch.length :], skip_special_tokens=True)

    # --- running -----------------------------------------------------------------------------
    def _plan(
        self,
        batch: Batch,
        knockouts: Iterable[Knockout] = (),
        patches: Iterable[Patch] = (),
        capture: Capture | None = None,
        attention_stats: bool = False,
        interventions: Iterable[Intervention] = (),
    ) -> Plan:
        """The interventions bound to ``batch`` (`engine.state.resolve`), refused up front where they cannot apply."""
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
            interventions=interventions,
            model=self.shape,
        )
        if plan.attention_layers() and self._attn not in engine_attention.WRAPS.values():
            raise InterventionError(
                "Knockouts, attention statistics and head/pattern hooks need attn_implementation 'sdpa' or 'eager'; "
                f"this model uses {self._attn!r}. Load it with narrowgate.load(..., attn_implementation='sdpa')."
            )
        recurrent.refuse(plan, self.mixers, self.attention_layers, self.family.name)
        if "mlp_out" in plan.sites and not self._has_mlp:
            raise InterventionError(f"This {self.family.name} model's decoder layers have no mlp module for 'mlp_out'.")
        return plan

    @contextlib.contextmanager
    def _running(self, plan: Plan, record: Record | None = None, *, check: bool = True) -> Iterator[Run]:
        """The one way narrowgate runs the model: every model call (forward, prefix, suffix passes, generation,
        training) happens inside this block with ``plan`` active; on leaving it, the run's scratch state is dropped
        (`Scratch.release`: a kept `Run` holds its record, not its masks) and the check that every intervention of
        the plan was applied (``check=False``: a prefix pass, whose reads the suffix completes). Yields the `Run`
        (its record holds what the call produced)."""
        run = Run(plan, record or Record(), Scratch(budget=self.budget))
        try:
            with activate(run):
                yield run
        finally:
            run.scratch.release()
        if check:
            run.check_applied()

    @contextlib.contextmanager
    def intervening(
        self,
        batch: Batch,
        *,
        interventions: Iterable[Intervention] = (),
        knockouts: Iterable[Knockout] = (),
        patches: Iterable[Patch] = (),
    ) -> Iterator[Run]:
        """Interventions active, under autograd, for every model call inside the block.

        For training: the same attention functions and hooks as `forward`, with gradients and in
        training mode. ``backward()`` may run after the block; with gradient checkpointing, enable it
        through `enable_gradient_checkpointing` so the recompute sees the same interventions. On
        leaving the block the engine checks that every intervention was applied. Edits only: read
        captures and attention statistics with `forward`.
        """
        plan = self._plan(batch, knockouts, patches, interventions=interventions)
        reads = [r.name for r in plan.edits if r.first_affected() is None or isinstance(r, ResolvedStats)]
        if reads:
            raise InterventionError(f"intervening applies edits only ({reads[0]} reads); read with VLM.forward.")
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
        interventions: Iterable[Intervention] = (),
        knockouts: Iterable[Knockout] = (),
        patches: Iterable[Patch] = (),
        capture: Capture | None = None,
        attention_stats: bool = False,
    ) -> Output:
        """One forward pass with ``interventions`` (any `Intervention`: `Knockout`, `Patch`, `Capture`, `Hook`...).

        ``knockouts``, ``patches``, ``capture`` and ``attention_stats`` are shorthands: at each site the
        knockouts and patches apply first, then ``interventions`` in order, then the capture and statistics."""
        plan = self._plan(batch, knockouts, patches, capture, attention_stats, interventions)
        return self._forward_plan(batch, plan, attention_stats)

    def _forward_plan(self, batch: Batch, plan: Plan, attention_stats: bool) -> Output:
        with self._running(plan) as run:
            out = self.model(**self.model_inputs(batch), use_cache=False)
        stats = attention_stats or any(isinstance(r, ResolvedStats) for r in plan.edits)
        cma = build(batch, run.record.column_attention, self.n_layers) if stats else None
        return Output(
            logits=out.logits, residuals=run.residuals(), capture_resids=plan.capture_resids, cross_modal_attention=cma
        )

    @torch.no_grad()
    def generate(
        self,
        batch: Batch,
        *,
        interventions: Iterable[Intervention] = (),
        knockouts: Iterable[Knockout] = (),
        patches: Iterable[Patch] = (),
        max_new_tokens: int = 20,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy generation (unless ``kwargs`` say otherwise) with interventions on; token ids [B, T + new].
        Every generated token counts as a ``text`` position.

        With interventions, the prefix they cannot touch runs once with stock attention and only the
        rest through the engine (see `generate_conditions`); the result is the same.
        """
        if not knockouts and not patches and not interventions:
            return self._generate_plans(batch, [self._plan(batch)], 0, max_new_tokens, kwargs)[0]
        cond = shared.Condition("generate", tuple(knockouts), tuple(patches), tuple(interventions))
        return self.generate_conditions(batch, [cond], max_new_tokens=max_new_tokens, **kwargs)["generate"]

    def _prefix_from(self, batch: Batch) -> int:
        """The first position a shared prefix may end at (`Family.causal_from`); past the batch where no suffix can
        run without the image, so that the conditions run in full."""
        return self.family.causal_from(batch.inputs) if self._suffix_without_image else batch.length

    def _keep_last(self, keep: int = 1) -> dict:
        """Ask the model for the last ``keep`` positions' logits only, where its forward supports it."""
        return {"logits_to_keep": keep} if self._has_logits_to_keep else {}

    def _gen_kwargs(self, kwargs: dict) -> dict:
        """Greedy by default, padding with the tokenizer's pad token."""
        out = {"do_sample": False, **kwargs}
        pad = getattr(self.family.tokenizer, "pad_token_id", None)
        if pad is not None:
            out.setdefault("pad_token_id", pad)
        return out

    # --- delegates: shared-prefix scheduling (engine.runner), attribution (engine.attribution) ---------------
    def share_prefix(self, batch: Batch, length: int, capture: Capture | None = None) -> shared.SharedPrefix:
        """Run the first ``length`` positions once; the result serves any number of suffix passes."""
        return self.runner.share_prefix(batch, length, capture)

    def forward_conditions(
        self,
        batch: Batch,
        conditions: shared.Conditions,
        *,
        interventions: Iterable[Intervention] = (),
        capture: Capture | None = None,
        attention_stats: bool = False,
        keep: int = 1,
    ) -> dict[str, shared.ConditionOutput]:
        """Run several conditions (named intervention sets, `Condition`) on one batch, sharing the unchanged prefix.

        ``interventions`` apply in every condition, after its own; a `Capture` among them (or ``capture``) is
        read once for all. Returns per condition the logits at the last position (and, with ``keep > 1``,
        those of the last ``keep`` positions), the captured residuals and, with ``attention_stats``, the
        cross-modal attention. The prefix runs once; the conditions' suffixes run together as batch rows, as
        many per pass as memory allows. Equal to separate `forward` calls.
        """
        with torch.no_grad():
            return self.runner.forward_conditions(
                batch,
                conditions,
                capture=capture,
                attention_stats=attention_stats,
                keep=keep,
                interventions=interventions,
            )

    @torch.no_grad()
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
        return self.runner.forward_knockouts(prefix, sources, target=target, layers=layers, mode=mode, reduce=reduce)

    def attribute(
        self, prefix: shared.SharedPrefix, *, target: str | tuple = "text", mode: str = "mask"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`narrowgate.engine.attribution.attribute`: the first-order estimate of knocking out each position."""
        return attribution.attribute(self, prefix, target=target, mode=mode)

    @torch.no_grad()
    def generate_conditions(
        self,
        batch: Batch,
        conditions: shared.Conditions,
        *,
        interventions: Iterable[Intervention] = (),
        max_new_tokens: int = 20,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Greedy generation for several conditions, sharing the unchanged prefix; token ids [B, T + new] each.
        ``interventions`` apply in every condition, after its own."""
        return self.runner.generate_conditions(
            batch, conditions, max_new_tokens=max_new_tokens, interventions=interventions, **kwargs
        )

    @torch.no_grad()
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
        """Greedy generation under C knockouts ``sources[c] -> target`` at every layer; token ids [B, T + new] each.

        ``sources`` is a [C, B, T] boolean mask of arbitrary key positions, as in `forward_knockouts` (the
        gate scan's single positions); the prompt up to the first target position runs once and is shared.
        """
        return self.runner.generate_knockouts(
            batch, sources, target=target, mode=mode, max_new_tokens=max_new_tokens, **kwargs
        )

    def _generate_plans(
        self, batch: Batch, plans: list[Plan], P: int, max_new_tokens: int, kwargs: dict
    ) -> list[torch.Tensor]:
        return self.runner.generate_plans(batch, plans, P, max_new_tokens, kwargs)
