"""Emu3 (``emu3``: BAAI/Emu3-Chat-hf, BAAI/Emu3-Gen-hf).

The processor expands ``<image>`` for an image of h x w VQ codes to::

    <|image start|> "h*w" <|image token|> <image> x h*(w+1) <|extra_201|> <|image end|>
        boi          size     wrapper         placeholders       eof          eoi

Inside ``forward`` the VQ-VAE encodes the pixels and the model appends the end-of-line id
``<|extra_200|>`` to every row of codes, so the last of every w+1 placeholders is a line break,
not an image code. The image span runs from the size text to ``<|extra_201|>`` inclusive: size
tokens, ``<|image token|>`` and ``<|extra_201|>`` are in-image specials; ``eol`` is every
(w+1)-th placeholder; ``image_content`` is the other h*w placeholders. ``boi`` is
``<|image start|>``, ``eoi`` is ``<|image end|>``.

The size tokens are ordinary digits and the line breaks are ``<image>`` ids in ``input_ids``, so
no id-based rule finds them: `layout` reads the structure, taking h and w from the size text.

Prompt: ``USER: <image>{prompt} ASSISTANT:`` (``USER: {prompt} <image>ASSISTANT:`` text first).
That is what the Emu3-Chat-hf chat template renders, but the template puts every image before
every text part whatever their order, so narrowgate always writes the prompt itself.
"""

from __future__ import annotations

import re

from .base import Family, ImageLayout, LayoutError

_SIZE = re.compile(r"\s*(\d+)\s*\*\s*(\d+)\s*")


class Emu3(Family):
    """Emu3: one image per prompt, its structure (size text, rows closed by line breaks) read by `layout`."""

    name = "emu3"
    model_types = ("emu3",)
    checkpoints = ("BAAI/Emu3-Chat-hf", "BAAI/Emu3-Gen-hf")
    eoi_doc = "eoi is <|image end|>, the end-of-image token after the image's <|extra_201|> (eof) token."
    several = videos = False  # its raw prompt and layout hold one image

    def setup(self) -> None:
        """Resolves the wrapper, end-of-frame and end-of-line ids besides the image's start and end."""
        p = self.processor
        self.content_ids = frozenset({self.token_id(self.image_token)})
        self.wrapper_id = self.token_id(p.fake_token_around_image)  # <|image token|>
        self.eof_id = self.token_id(p.eof_token)  # <|extra_201|>
        self.special_ids = frozenset({self.wrapper_id, self.eof_id})  # plus the size text, found by position
        # The id the model substitutes at the end of each row; input_ids hold <image> there.
        self.eol_ids = frozenset({self.token_id("<|extra_200|>")})
        self.boi_id = self.token_id(p.image_start_token)  # <|image start|>
        self.eoi_id = self.token_id(p.image_end_token)  # <|image end|>

    def prompt(self, text: str, image_first: bool = True, kinds: tuple[str, ...] = ("image",)) -> str:
        """The raw prompt (Emu3's chat template is not used), with one image."""
        if tuple(kinds) != ("image",):
            raise LayoutError(f"The {self.name} adapter lays out one image per prompt; give one image per example.")
        return self.raw_prompt(text, image_first)

    def raw_prompt(self, text: str, image_first: bool) -> str:
        """The Emu3-Chat form, ``USER: ... ASSISTANT:``."""
        body = f"{self.image_token}{text} " if image_first else f"{text} {self.image_token}"
        return f"USER: {body}ASSISTANT:"

    def layout(self, ids: list[int], first: int) -> ImageLayout:
        """Read off the structure: h and w from the size text, then every (w+1)-th placeholder a line break."""
        starts = [i for i in range(first, len(ids)) if ids[i] == self.boi_id]
        if len(starts) != 1:
            raise LayoutError(f"Expected exactly one <|image start|> token in the example, found {len(starts)}.")
        boi = starts[0]
        try:
            wrapper = ids.index(self.wrapper_id, boi)
        except ValueError:
            raise LayoutError("No <|image token|> follows <|image start|>: not an Emu3 image span.") from None
        size = _SIZE.fullmatch(self.tokenizer.decode(ids[boi + 1 : wrapper]))
        if size is None:
            raise LayoutError("The Emu3 image span does not start with its 'height*width' size text.")
        h, w = int(size.group(1)), int(size.group(2))
        pad_start, eof = wrapper + 1, wrapper + 1 + h * (w + 1)
        if eof >= len(ids) or any(t not in self.content_ids for t in ids[pad_start:eof]) or ids[eof] != self.eof_id:
            raise LayoutError(
                f"The Emu3 image span should hold {h}*({w}+1) <image> tokens followed by the eof token; it does not."
            )
        pads = range(pad_start, eof)
        eol = [p for p in pads if (p - pad_start) % (w + 1) == w]
        content = [p for p in pads if (p - pad_start) % (w + 1) != w]
        eoi = eof + 1 if eof + 1 < len(ids) else None
        return ImageLayout(start=boi + 1, end=eof, content=content, eol=eol, boi=boi, eoi=eoi)

    def check_layout(self, ids: list[int], layout: ImageLayout) -> None:
        """Requires ``<|image end|>`` right after the span (the base check lets a missing ``eoi`` pass)."""
        if layout.eoi is None or ids[layout.eoi] != self.eoi_id:
            found = "nothing" if layout.eoi is None else f"id {ids[layout.eoi]}"
            raise LayoutError(
                f"The Emu3 image span is followed by {found}, not the end-of-image id {self.eoi_id} "
                "(<|image end|>); the processor output does not have the expected layout."
            )
