"""What every model-family adapter provides, and the generic behaviour they share.

An adapter says only what is special about its family: which token ids make up the image span,
which token ends it, how a prompt is written. Everything else (roles, batching, interventions)
is generic and lives outside `families/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch


class LayoutError(ValueError):
    """A tokenised example does not contain exactly one well-formed image span."""


@dataclass
class ImageLayout:
    """Positions of the image and its neighbours in one (unpadded-index) token sequence.

    All positions are absolute indices into the padded row they were computed from.
    """

    start: int  # first position of the image span
    end: int  # last position of the image span (inclusive)
    content: list[int]  # content-token positions (inside the span)
    eol: list[int] = field(default_factory=list)  # in-image line breaks
    boi: int | None = None  # image-start special token, just before the span
    eoi: int | None = None  # first token after the span (None if the sequence ends with the image)


class Family:
    """Base class of a model-family adapter.

    Subclasses set the class attributes and, where needed, override `raw_prompt`, `setup`
    or `layout`. ``setup`` resolves token ids from the processor's tokenizer, so no id is ever
    hard-coded.
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    checkpoints: ClassVar[tuple[str, ...]] = ()
    #: One sentence saying which token plays [EOI] in this family.
    eoi_doc: ClassVar[str] = ""
    #: Extra keyword arguments for the processor call.
    processor_kwargs: ClassVar[dict] = {}

    def __init__(self, processor, config):
        self.processor = processor
        self.config = config
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.content_ids: frozenset[int] = frozenset()
        self.special_ids: frozenset[int] = frozenset()
        self.eol_ids: frozenset[int] = frozenset()
        self.boi_id: int | None = None
        self.eoi_id: int | None = None
        self.setup()

    # --- token ids -------------------------------------------------------------------------
    def token_id(self, token: str) -> int:
        """Id of a special token in the tokenizer, with a clear error when it is missing."""
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if tid is None or (unk is not None and tid == unk and token != self.tokenizer.unk_token):
            raise LayoutError(
                f"The {self.name} tokenizer has no token {token!r}; is this processor really a {self.name} processor?"
            )
        return int(tid)

    def setup(self) -> None:
        """Resolve the id sets. Default: the processor's ``image_token`` is the only content id."""
        self.content_ids = frozenset({self.token_id(self.image_token)})

    @property
    def image_token(self) -> str:
        token = getattr(self.processor, "image_token", None)
        if token is None:
            raise LayoutError(f"The {self.name} processor defines no image_token.")
        return token

    # --- prompts -----------------------------------------------------------------------------
    def prompt(self, text: str, image_first: bool = True) -> str:
        """The full prompt string for one example: the image placeholder plus ``text``.

        Uses the processor's chat template when it has one, `raw_prompt` otherwise.
        """
        if getattr(self.processor, "chat_template", None):
            parts = [{"type": "image"}, {"type": "text", "text": text}]
            if not image_first:
                parts.reverse()
            messages = [{"role": "user", "content": parts}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.raw_prompt(text, image_first)

    def raw_prompt(self, text: str, image_first: bool) -> str:
        """Prompt used when the processor has no chat template: image and text side by side."""
        return f"{self.image_token}{text}" if image_first else f"{text}{self.image_token}"

    def encode(self, images: list, texts: list[str]):
        """Run the processor on full prompt strings, left-padded.

        Special tokens are added by the tokenizer unless the prompt (from a chat template) already
        starts with the BOS token, so no example gets two.
        """
        self.tokenizer.padding_side = "left"
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not (bos and all(t.startswith(bos) for t in texts))
        return self.processor(
            images=images,
            text=texts,
            padding=True,
            return_tensors="pt",
            add_special_tokens=add_special,
            **self.processor_kwargs,
        )

    def position_ids(self, inputs) -> torch.Tensor | None:
        """Position ids for a left-padded batch, counted from each row's first real token.

        The same rule `generate` uses, so a padded example gets the positions it would have alone
        and forward passes agree with generation. Families with other position schemes (M-RoPE)
        override this; None leaves positions to the model.
        """
        mask = inputs.get("attention_mask")
        if mask is None:
            return None
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)

    def attach(self, model) -> None:
        """Called once with the loaded model (`VLM` does); adapters that read nothing from it keep the default."""

    def causal_from(self, inputs) -> int:
        """The first position from which the model's attention is causal: earlier positions may attend to later
        ones, so no shared prefix may end before it (nor before a token after the image whose input the image pass
        writes: Ovis2's <IMG_END>). 0: causal everywhere outside the image (most families)."""
        return 0

    # --- layout ------------------------------------------------------------------------------
    def layout(self, ids: list[int], first: int) -> ImageLayout:
        """Locate the image in one row of input ids; ``first`` is the first non-padding position.

        Default: the span is the contiguous run of content and in-image special ids; the
        boi token is the one just before it (if it is the family's boi id); eoi is the one after.
        """
        span_ids = self.content_ids | self.special_ids
        hits = [i for i in range(first, len(ids)) if ids[i] in span_ids]
        if not hits:
            raise LayoutError(f"No image tokens found in the example (expected ids {sorted(span_ids)}).")
        start, end = hits[0], hits[-1]
        if len(hits) != end - start + 1:
            raise LayoutError("The image span is not contiguous: narrowgate supports exactly one image per example.")
        content = [i for i in hits if ids[i] in self.content_ids]
        eol = [i for i in hits if ids[i] in self.eol_ids]
        boi = start - 1 if self.boi_id is not None and start - 1 >= first and ids[start - 1] == self.boi_id else None
        eoi = end + 1 if end + 1 < len(ids) else None
        return ImageLayout(start=start, end=end, content=content, eol=eol, boi=boi, eoi=eoi)

    def check_layout(self, ids: list[int], layout: ImageLayout) -> None:
        """Verify family invariants (e.g. that eoi is the end-of-image id where one exists)."""
        if self.eoi_id is not None and layout.eoi is not None and ids[layout.eoi] != self.eoi_id:
            raise LayoutError(
                f"The token after the {self.name} image span is id {ids[layout.eoi]}, not the end-of-image id "
                f"{self.eoi_id}; the processor output does not have the expected layout."
            )

    # --- model structure -----------------------------------------------------------------------
    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The language model's decoder layers (residual index l is the input of layer l)."""
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        layers = getattr(decoder, "layers", None)
        if layers is None:  # a decoder that is itself a causal LM (Llama 4)
            layers = getattr(getattr(decoder, "model", None), "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
        for name, module in model.named_modules():  # OPT keeps them in its decoder (BLIP-2)
            if (
                name.endswith(("language_model.layers", "language_model.model.decoder.layers"))
                or name == "model.layers"
            ):
                return module
        raise LayoutError(f"Could not find the decoder layers of this {self.name} model.")

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The language model's final norm, applied after the last decoder layer (``norm``; OPT's, in BLIP-2, is its
        decoder's ``final_layer_norm``)."""
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        inner = getattr(decoder, "model", None)
        for owner in (decoder, inner, getattr(decoder, "decoder", None), getattr(inner, "decoder", None)):
            for name in ("norm", "final_layer_norm"):
                if isinstance(getattr(owner, name, None), torch.nn.Module):
                    return getattr(owner, name)
        return None

    @classmethod
    def accepts(cls, vision_model_type: str | None) -> bool:
        """Whether this adapter serves a model whose vision tower has this ``model_type``."""
        return True
