"""Any decoder-only VLM whose image is a run of placeholder tokens in ``input_ids`` and that has no dedicated adapter.

Roles come only from what the processor, its tokenizer and the config name:

- content: the token the model replaces with image features (``config.image_token_id`` /
  ``image_token_index``, else the processor's ``image_token_id`` or ``image_token``); the prompt's placeholder
  is the processor's ``image_placeholder_token`` where it names one (Qianfan-OCR writes ``<image>`` and expands
  it to ``<IMG_CONTEXT>`` tokens), else its ``image_token``, which may differ from the content token (Gemma 3
  writes ``<start_of_image>``, Aya Vision ``<image>``);
- ``boi`` / ``eoi``: the begin/end-of-image specials where the processor or tokenizer names them
  (``boi_token``/``eoi_token``, ``image_start_token``/``image_end_token``, ``start_image_token``/
  ``end_image_token``, ``vision_start_token``/``vision_end_token``) or the config gives their ids;
- ``eol``: an in-image line break (``image_break_token``, ``config.image_break_token_id``).

With both a begin and an end token the image span is everything strictly between them, so specials the
adapter does not know (tile separators, size tokens) are in-image specials; otherwise it is the run of
placeholder and line-break tokens. Without an end-of-image token ``eoi`` is the first token after the span.
Anything it cannot find is refused with a message naming it, never guessed.

What the engine meets in these models composes with knockouts, because a knockout only removes entries from the
model's own mask: sliding-window layers beside global ones, bidirectional attention inside the image (Gemma 3's
token types) or over the whole prompt (PaliGemma's prefix-LM, where no shared prefix may end inside the prompt:
`causal_from`), logit soft-capping (eager attention). Qwen3-VL's deepstack adds visual features to the image
positions' residuals after each of its first decoder layers, not only at the input: an image -> text knockout
still leaves the text blind, but the image positions (a candidate gate among them) receive the image again
at those depths, so a gate found there is fed from several layers, not from the embeddings alone.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from .base import Family, ImageLayout, Inputs, LayoutError, Processor

if TYPE_CHECKING:
    from transformers import BatchFeature, PreTrainedConfig

#: Processor / tokenizer attributes holding each special token, in the order they are tried.
BOI_NAMES = ("boi_token", "image_start_token", "start_image_token", "start_of_img_token", "vision_start_token")
EOI_NAMES = ("eoi_token", "image_end_token", "end_image_token", "end_of_img_token", "vision_end_token")
EOL_NAMES = ("image_break_token", "img_line_break_token")
#: Config attributes holding the same tokens' ids.
IMAGE_ID_NAMES = ("image_token_id", "image_token_index")
BOI_ID_NAMES = ("boi_token_id", "boi_token_index", "image_start_token_id", "vision_start_token_id")
EOI_ID_NAMES = ("eoi_token_id", "eoi_token_index", "image_end_token_id", "vision_end_token_id")
EOL_ID_NAMES = ("image_break_token_id",)


def out_of_scope(config: PreTrainedConfig) -> str | None:
    """Why a model with this config is not a decoder reading image tokens in its sequence (None: it is)."""
    text = getattr(config, "text_config", config)
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        return "it is an encoder-decoder model: the image reaches the text through cross-attention, not as tokens"
    if getattr(text, "cross_attention_layers", None):
        return "its decoder reads the image through cross-attention layers, not as tokens in the sequence"
    return None


def refusal(config: PreTrainedConfig) -> str | None:
    """Why the generic adapter cannot serve a model with this config (None: it may)."""
    why = out_of_scope(config)
    if why is not None:
        return why
    if not any(getattr(config, n, None) is not None for n in IMAGE_ID_NAMES):
        return "its config names no image placeholder token (image_token_id / image_token_index)"
    return None


def wants_mm_token_types(config: PreTrainedConfig) -> bool:
    """Whether the model class for this config takes ``mm_token_type_ids`` (Cosmos 3, Qwen 3.5)."""
    from ..compat import image_text_to_text_class

    cls = image_text_to_text_class(config)
    if cls is None:
        return False
    return "mm_token_type_ids" in inspect.signature(cls.forward).parameters


class Generic(Family):
    """Any decoder-only VLM without a dedicated adapter, its roles read from what the processor and config name."""

    name = "generic"
    eoi_doc = "The end-of-image token the processor names; without one, eoi is the first token after the image tokens."

    def __init__(self, processor: Processor, config: PreTrainedConfig) -> None:
        self.name = config.model_type
        super().__init__(processor, config)

    @property
    def image_token(self) -> str:
        """The image placeholder a raw prompt holds (see the module docstring)."""
        placeholder = getattr(self.processor, "image_placeholder_token", None)
        return placeholder if isinstance(placeholder, str) and placeholder else super().image_token

    def _named(self, names: tuple[str, ...]) -> str | None:
        for owner in (self.processor, self.tokenizer):
            for n in names:
                value = getattr(owner, n, None)
                if isinstance(value, str) and value:
                    return value
        return None

    def _config_id(self, names: tuple[str, ...]) -> int | None:
        for owner in (self.config, getattr(self.config, "text_config", None)):
            for n in names:
                value = getattr(owner, n, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
        return None

    def _special(self, names: tuple[str, ...], id_names: tuple[str, ...], what: str) -> int | None:
        token = self._named(names)
        if token is not None:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            unk = getattr(self.tokenizer, "unk_token_id", None)
            if tid is None or tid == unk:
                raise LayoutError(
                    f"The {self.name} processor names {token!r} as its {what} token, but the tokenizer lacks it."
                )
            return int(tid)
        return self._config_id(id_names)

    def setup(self) -> None:
        """Content, begin/end-of-image and line-break ids from the config and the processor's names; ``eoi_doc``
        names the end-of-image token found."""
        image_id = self._config_id(IMAGE_ID_NAMES)
        if image_id is None and isinstance(getattr(self.processor, "image_token_id", None), int):
            image_id = self.processor.image_token_id
        token = self._named(("image_token",))
        if image_id is None and token is not None:
            image_id = self.token_id(token)
        if image_id is None:
            raise LayoutError(
                f"The {self.name} processor has no image_token and the config no image_token_id / image_token_index: "
                "narrowgate cannot tell which tokens are the image."
            )
        self.content_ids = frozenset({image_id})
        specials = {}
        for role, names, id_names, what in (
            ("boi", BOI_NAMES, BOI_ID_NAMES, "begin-of-image"),
            ("eoi", EOI_NAMES, EOI_ID_NAMES, "end-of-image"),
            ("eol", EOL_NAMES, EOL_ID_NAMES, "line-break"),
        ):
            tid = self._special(names, id_names, what)
            specials[role] = None if tid == image_id else tid
        self.boi_id, self.eoi_id = specials["boi"], specials["eoi"]
        if specials["eol"] is not None:
            self.special_ids = self.eol_ids = frozenset({specials["eol"]})
        if self.eoi_id is not None:
            end = self.tokenizer.convert_ids_to_tokens(self.eoi_id)
            self.eoi_doc = f"eoi is {end}, the end-of-image token the processor writes after the image."
        else:
            self.eoi_doc = "No end-of-image token: eoi is the first token after the image tokens."

    def encode(self, images: list[Any], texts: list[str], videos: list[Any] | None = None) -> BatchFeature:
        """As every family, with one list of images per prompt (the form most processors accept), the processor's
        ``mm_token_type_ids`` where the model takes them (it needs them to place image features) and no labels."""
        if wants_mm_token_types(self.config):
            self.processor_kwargs = {"return_mm_token_type_ids": True}
        if videos or any(isinstance(x, list) for x in images):
            inputs = super().encode(images, texts, videos)
        else:
            try:
                inputs = super().encode([[im] for im in images], texts)
            except ValueError:  # a processor taking one image per prompt only (GOT-OCR 2)
                inputs = super().encode(images, texts)
        inputs.pop("labels", None)  # PaliGemma's processor adds training labels; a loss is no model input here
        return inputs

    def layout(self, ids: list[int], first: int) -> ImageLayout:
        """Between the begin and end tokens when the family has both; the run of image tokens otherwise."""
        if self.boi_id is None or self.eoi_id is None:
            return super().layout(ids, first)
        starts = [i for i in range(first, len(ids)) if ids[i] == self.boi_id]
        ends = [i for i in range(first, len(ids)) if ids[i] == self.eoi_id]
        if len(starts) != 1 or len(ends) != 1 or ends[0] <= starts[0] + 1:
            raise LayoutError(
                f"Expected one {self.name} image span per image (one begin- and one end-of-image token, image tokens "
                f"between them); found {len(starts)} begin and {len(ends)} end tokens."
            )
        start, end = starts[0] + 1, ends[0] - 1
        inside = range(start, end + 1)
        content = [i for i in inside if ids[i] in self.content_ids]
        if not content:
            raise LayoutError(f"The {self.name} image span holds no image placeholder token.")
        outside = [i for i in range(first, len(ids)) if ids[i] in self.content_ids and not start <= i <= end]
        if outside:
            raise LayoutError(
                f"{self.name} image tokens outside the span of begin- and end-of-image tokens: the prompt does not have "
                "the expected layout."
            )
        eol = [i for i in inside if ids[i] in self.eol_ids]
        return ImageLayout(start=start, end=end, content=content, eol=eol, boi=starts[0], eoi=ends[0])

    def check_layout(self, ids: list[int], layout: ImageLayout) -> None:
        """Also refuses a prompt that ends inside the image."""
        super().check_layout(ids, layout)
        if layout.eoi is None and layout.end == len(ids) - 1:
            raise LayoutError(f"The {self.name} prompt ends inside the image: no token follows the image span.")

    def causal_from(self, inputs: Inputs) -> int:
        """Past every ``token_type_ids == 0`` position when the image tokens are type 0: the model then attends
        bidirectionally over the whole type-0 prompt (PaliGemma's prefix-LM). Where the image tokens are the ones
        marked (Gemma 3), only the image is bidirectional, and it ends before any shared prefix does."""
        types, ids = inputs.get("token_type_ids"), inputs["input_ids"]
        if types is None:
            return 0
        image = torch.isin(ids, torch.tensor(sorted(self.content_ids), device=ids.device))
        if not image.any() or bool((types[image] != 0).any()):
            return 0
        zero = (types == 0).any(0).nonzero()
        return int(zero.max()) + 1

    def attach(self, model: torch.nn.Module) -> None:
        """Keeps the model's ``get_rope_index``, where it has one, for `position_ids`."""
        self.model_positions(model)

    def position_ids(self, inputs: Inputs) -> torch.Tensor | None:
        """Multi-axis rotary positions (M-RoPE) from the model's own ``get_rope_index`` (`rope_positions`); 1-D
        positions otherwise."""
        pos = self.rope_positions(inputs)
        return super().position_ids(inputs) if pos is None else pos
