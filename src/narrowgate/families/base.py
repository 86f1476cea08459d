"""What every model-family adapter provides, and the generic behaviour they share.

An adapter says only what is special about its family: which token ids make up the image span,
which token ends it, how a prompt is written. Everything else (roles, batching, interventions)
is generic and lives outside `families/`.
"""

from __future__ import annotations

import inspect
from abc import ABC
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from transformers import BatchFeature, PreTrainedConfig

#: A transformers processor (or a bare tokenizer): its attributes (``image_token``, ``tokenizer``...) differ by
#: family and are read by name, which transformers' own typing does not describe.
Processor = Any
#: The processor's tokenizer: transformers types its methods with unions over the argument's form (one token or a
#: list: ``str | list[str]``) and no overloads, so a single-token call would need a cast at every use.
Tokenizer = Any
#: What the processor returns for a batch (a `transformers.BatchFeature`): model inputs by name.
Inputs = Mapping[str, Any]


class LayoutError(ValueError):
    """A tokenised example does not contain the well-formed image spans it should."""


@dataclass
class ImageLayout:
    """Positions of one image (or video) and its neighbours in one token sequence.

    All positions are absolute indices into the padded row they were computed from. A video is one span whose
    content tokens come frame by frame: ``frames`` holds each frame's content positions (empty for an image).
    """

    start: int  # first position of the image span
    end: int  # last position of the image span (inclusive)
    content: list[int]  # content-token positions (inside the span)
    eol: list[int] = field(default_factory=list)  # in-image line breaks
    boi: int | None = None  # image-start special token, just before the span
    eoi: int | None = None  # first token after the span (None if the sequence ends with the image)
    frames: list[list[int]] = field(default_factory=list)  # a video's content positions, frame by frame

    @property
    def is_video(self) -> bool:
        """Whether this is a video's span (its content comes frame by frame)."""
        return bool(self.frames)

    @property
    def first(self) -> int:
        """The first position of the image: its boi, else the span's start."""
        return self.start if self.boi is None else self.boi

    def shifted(self, by: int) -> ImageLayout:
        """The same layout ``by`` positions later (a row padded further on the left)."""
        return ImageLayout(
            start=self.start + by,
            end=self.end + by,
            content=[p + by for p in self.content],
            eol=[p + by for p in self.eol],
            boi=None if self.boi is None else self.boi + by,
            eoi=None if self.eoi is None else self.eoi + by,
            frames=[[p + by for p in f] for f in self.frames],
        )


@dataclass(frozen=True)
class Item:
    """One image or video of an example's prompt: its kind and its index among the batch's images (or videos), in
    the order the processor numbers them (examples in order, each example's in prompt order)."""

    kind: str  # "image" or "video"
    index: int


KINDS = ("image", "video")


class Family(ABC):  # noqa: B024 -- no hook is required: each has a default a shipped family relies on
    """Base class of a model-family adapter.

    Subclasses set the class attributes and, where needed, override `raw_prompt`, `setup`
    or `layout`. ``setup`` resolves token ids from the processor's tokenizer, so no id is ever
    hard-coded. No hook is abstract: each has the behaviour most families need (a LLaVA-1.5 adapter overrides only
    its raw prompt), so an adapter overrides just what its family does differently.
    """

    name: str = ""  # a class attribute; `generic` names each instance after its model type
    model_types: ClassVar[tuple[str, ...]] = ()
    checkpoints: ClassVar[tuple[str, ...]] = ()
    #: One sentence saying which token plays [EOI] in this family.
    eoi_doc: str = ""
    #: Extra keyword arguments for the processor call.
    processor_kwargs: dict[str, Any] = {}
    #: Whether the adapter lays out several images (and videos) in one prompt (`layouts`).
    several: ClassVar[bool] = True
    #: Whether the adapter lays out a video (one span of video placeholders, frame after frame) where the
    #: processor and the model take one.
    videos: ClassVar[bool] = True

    def __init__(self, processor: Processor, config: PreTrainedConfig) -> None:
        self.processor = processor
        self.config = config
        self.tokenizer: Tokenizer = getattr(processor, "tokenizer", processor)
        self.content_ids: frozenset[int] = frozenset()
        self.special_ids: frozenset[int] = frozenset()
        self.eol_ids: frozenset[int] = frozenset()
        self.boi_id: int | None = None
        self.eoi_id: int | None = None
        self.video_ids: frozenset[int] = self._video_ids() if self.videos else frozenset()
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

    def _video_ids(self) -> frozenset[int]:
        """The video placeholder's id, where the processor takes video (its ``video_token``) and the model reads it
        (the config's ``video_token_id`` / ``video_token_index``); empty otherwise."""
        token = getattr(self.processor, "video_token", None)
        if not isinstance(token, str) or getattr(self.processor, "video_processor", None) is None:
            return frozenset()
        for owner in (self.config, getattr(self.config, "text_config", None)):
            for name in ("video_token_id", "video_token_index"):
                value = getattr(owner, name, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    return frozenset({value})
        return frozenset()

    @property
    def image_token(self) -> str:
        """The placeholder a prompt writes for an image (the processor's ``image_token``)."""
        token = getattr(self.processor, "image_token", None)
        if token is None:
            raise LayoutError(f"The {self.name} processor defines no image_token.")
        return token

    @property
    def video_token(self) -> str:
        """The placeholder a prompt writes for a video; refused where the adapter reads no video."""
        token = getattr(self.processor, "video_token", None)
        if not self.video_ids or not isinstance(token, str):
            raise LayoutError(
                f"This {self.name} model takes no video (its processor or config names no video token); give images."
            )
        return token

    # --- prompts -----------------------------------------------------------------------------
    def prompt(self, text: str, image_first: bool = True, kinds: tuple[str, ...] = ("image",)) -> str:
        """The full prompt string for one example: a placeholder per image or video (``kinds``, in order) plus
        ``text``.

        Uses the processor's chat template when it has one, `raw_prompt` otherwise, with the one image's
        placeholder there replaced by one per entry of ``kinds`` (`visual_text`; separated by a line break in a
        family without an end-of-image token, so every image has an ``eoi``).
        """
        kinds = tuple(kinds)
        if not kinds or any(k not in KINDS for k in kinds):
            raise LayoutError(f"Each example holds images and videos ({', '.join(KINDS)}), got {kinds}.")
        if "video" in kinds:
            self.video_token  # noqa: B018 -- refuses a model without video
        if getattr(self.processor, "chat_template", None):
            visuals = [{"type": k} for k in kinds]
            text_part = [{"type": "text", "text": text}]
            parts = visuals + text_part if image_first else text_part + visuals
            messages = [{"role": "user", "content": parts}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        raw = self.raw_prompt(text, image_first)
        if kinds == ("image",):
            return raw
        one = self.visual_text("image")
        if one not in raw:
            raise LayoutError(f"The {self.name} raw prompt holds no {one!r} to place the images at.")
        sep = "" if self.eoi_id is not None else "\n"
        return raw.replace(one, sep.join(self.visual_text(k) for k in kinds), 1)

    def raw_prompt(self, text: str, image_first: bool) -> str:
        """Prompt used when the processor has no chat template: image and text side by side."""
        return f"{self.image_token}{text}" if image_first else f"{text}{self.image_token}"

    def visual_text(self, kind: str) -> str:
        """What `raw_prompt` writes for one image (``kind="image"``) or one video."""
        return self.image_token if kind == "image" else self.video_token

    def encode(self, images: list[Any], texts: list[str], videos: list[Any] | None = None) -> BatchFeature:
        """Run the processor on full prompt strings, left-padded. ``images``: one per example, or a list per example
        (several in one prompt); ``videos``: every example's videos in order, or None.

        Special tokens are added by the tokenizer unless the prompt (from a chat template) already
        starts with the BOS token, so no example gets two.
        """
        self.tokenizer.padding_side = "left"
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not (bos and all(t.startswith(bos) for t in texts))
        media = {"videos": videos} if videos else {}
        has_images = any(not isinstance(x, list) or len(x) > 0 for x in images)
        return self.processor(
            images=images if has_images else None,
            text=texts,
            padding=True,
            return_tensors="pt",
            add_special_tokens=add_special,
            **media,
            **self.processor_kwargs,
        )

    def position_ids(self, inputs: Inputs) -> torch.Tensor | None:
        """Position ids for a left-padded batch, counted from each row's first real token.

        The same rule `generate` uses, so a padded example gets the positions it would have alone
        and forward passes agree with generation. Families with other position schemes (M-RoPE)
        override this; None leaves positions to the model.
        """
        mask = inputs.get("attention_mask")
        if mask is None:
            return None
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)

    def attach(self, model: torch.nn.Module) -> None:  # noqa: B027 -- optional: most adapters read nothing from it
        """Called once with the loaded model (`VLM` does); adapters that read nothing from it keep the default."""

    def model_positions(self, model: torch.nn.Module) -> None:
        """Keep the model's own multi-axis rotary position builder (``get_rope_index``), where it has one, for
        `rope_positions`."""
        self._rope_index = getattr(getattr(model, "model", model), "get_rope_index", None)

    def rope_positions(self, inputs: Inputs) -> torch.Tensor | None:
        """Positions from the model's own ``get_rope_index`` on the whole prompt (M-RoPE), so a suffix run on a
        cached prefix gets the positions a full forward would; None where the model has none."""
        rope_index = getattr(self, "_rope_index", None)
        if rope_index is None:
            return None
        wanted = inspect.signature(rope_index).parameters
        return rope_index(**{k: v for k, v in inputs.items() if k in wanted})[0]

    def causal_from(self, inputs: Inputs) -> int:
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

    def layouts(self, ids: list[int], first: int, items: list[Item], inputs: Inputs) -> list[ImageLayout]:
        """Every image and video of one row (``items``, in prompt order), located and checked: `layout` for a prompt
        holding one image; otherwise each in its own `segments` entry (`layout` for an image, `video_layout` for a
        video). ``inputs``: the processor's output for the whole batch."""
        if [i.kind for i in items] == ["image"]:
            lay = self.layout(ids, first)
            self.check_layout(ids, lay)
            return [lay]
        if not self.several:
            raise LayoutError(f"The {self.name} adapter lays out one image per prompt; give one image per example.")
        out = []
        for (a, b), item in zip(self.segments(ids, first, items, inputs), items):
            part = ids[:b]
            lay = self.layout(part, a) if item.kind == "image" else self.video_layout(part, a, item, inputs)
            self.check_layout(ids, lay)
            out.append(lay)
        return out

    def segments(self, ids: list[int], first: int, items: list[Item], inputs: Inputs) -> list[tuple[int, int]]:
        """Per item, the range [a, b) of the row that holds it and nothing of another item: from the end of the
        previous one to the token after its image tokens (its ``eoi``), unless the next item starts there.

        Default: the image tokens of each item are one run of content, video and in-image special ids; runs that
        touch (two images written back to back) are cut at the items' lengths where the family knows them
        (`item_lengths`), else refused."""
        span = self.content_ids | self.special_ids | self.video_ids
        runs: list[list[int]] = []
        for i in range(first, len(ids)):
            if ids[i] in span:
                if runs and runs[-1][1] == i:
                    runs[-1][1] = i + 1
                else:
                    runs.append([i, i + 1])
        if len(runs) != len(items):
            lengths = self.item_lengths(items, inputs)
            runs = _cut(runs, lengths) if lengths is not None else runs
        if len(runs) != len(items):
            raise LayoutError(
                f"The prompt holds {len(items)} images/videos but {len(runs)} runs of {self.name} image tokens: images "
                "written back to back cannot be told apart by this adapter; put text between them."
            )
        starts = [
            a - 1 if self.boi_id is not None and a - 1 >= first and ids[a - 1] == self.boi_id else a for a, _ in runs
        ]
        out, a = [], first
        for k, (_, end) in enumerate(runs):
            b = min(end + 1, starts[k + 1] if k + 1 < len(runs) else len(ids))
            out.append((a, b))
            a = b
        return out

    def item_lengths(self, items: list[Item], inputs: Inputs) -> list[int] | None:
        """How many image tokens each item has, where the family can tell from the processor's output (None: it
        cannot, so items written back to back are refused)."""
        return None

    def video_layout(self, ids: list[int], first: int, item: Item, inputs: Inputs) -> ImageLayout:
        """A video's span in ``ids[first:]``: `layout` with the video placeholder as the content id, the content
        then cut into the model's frames (`frame_count`)."""
        content = self.content_ids
        self.content_ids = self.video_ids
        try:
            lay = self.layout(ids, first)
        finally:
            self.content_ids = content
        return self.split_frames(self.video_newlines(lay), self.frame_count(inputs, item))

    def video_newlines(self, lay: ImageLayout) -> ImageLayout:
        """A video's span with its in-video line breaks (``eol``) marked, where the family writes any (default:
        none)."""
        return lay

    def frame_count(self, inputs: Inputs, item: Item) -> int:
        """How many frames the model encodes video ``item`` as: the temporal size of its ``video_grid_thw`` where
        the processor gives one (Qwen2-VL: input frames merged ``temporal_patch_size`` at a time), else the frames
        of its ``pixel_values_videos``."""
        grid = inputs.get("video_grid_thw")
        if grid is not None:
            return int(grid[item.index][0])
        pixels = inputs.get("pixel_values_videos")
        if pixels is None:
            raise LayoutError(f"The {self.name} processor returned no video inputs.")
        return int(pixels[item.index].shape[0])

    def split_frames(self, lay: ImageLayout, count: int) -> ImageLayout:
        """``lay`` with its content tokens cut into ``count`` frames of equal size, in order."""
        n = len(lay.content)
        if count < 1 or n % count:
            raise LayoutError(
                f"The {self.name} video has {n} content tokens, which do not split into its {count} frames."
            )
        size = n // count
        lay.frames = [lay.content[t * size : (t + 1) * size] for t in range(count)]
        return lay

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


def _cut(runs: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """``runs`` of image tokens cut into consecutive items of ``lengths`` tokens (unchanged where they do not add up)."""
    out: list[list[int]] = []
    queue = list(lengths)
    for a, b in runs:
        while queue and a < b and a + queue[0] <= b:
            out.append([a, a + queue[0]])
            a += queue.pop(0)
        if a != b:
            return runs
    return out if not queue else runs
