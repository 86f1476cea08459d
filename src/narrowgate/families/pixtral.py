"""Pixtral (``llava`` with a Pixtral vision tower and a Mistral decoder).

The ``[IMG]`` placeholder expands row by row: one ``[IMG]`` token per image patch, each row of
patches followed by ``[IMG_BREAK]``, except the last row, whose break is replaced by
``[IMG_END]``. The image span is the ``[IMG]`` and ``[IMG_BREAK]`` tokens; ``[IMG_BREAK]`` is
the in-image line break (``eol``) and ``[IMG_END]``, the token right after the span, is ``eoi``.
No image-start token. Only ``[IMG]`` positions receive image features; the breaks and
``[IMG_END]`` are ordinary embedded tokens.
Raw template (no chat template): ``<s>[INST][IMG]\\n{prompt}[/INST]`` (BOS added by the tokenizer).
"""

from __future__ import annotations

from .base import Family, ImageLayout, LayoutError


class Pixtral(Family):
    """Pixtral: rows of ``[IMG]`` tokens closed by ``[IMG_BREAK]``, the last by ``[IMG_END]``."""

    name = "pixtral"
    model_types = ("llava",)
    checkpoints = ("mistral-community/pixtral-12b",)
    eoi_doc = "[IMG_END] is the end-of-image token: it replaces the [IMG_BREAK] after the last row of [IMG] tokens."

    @classmethod
    def accepts(cls, vision_model_type: str | None) -> bool:
        """Only ``llava`` models with a Pixtral vision tower."""
        return vision_model_type == "pixtral"

    def setup(self) -> None:
        """Resolves ``[IMG_BREAK]`` as the in-image line break and ``[IMG_END]`` as ``eoi``."""
        p = self.processor
        image_break = self.token_id(getattr(p, "image_break_token", "[IMG_BREAK]"))
        self.content_ids = frozenset({self.token_id(self.image_token)})
        self.special_ids = frozenset({image_break})
        self.eol_ids = frozenset({image_break})
        self.eoi_id = self.token_id(getattr(p, "image_end_token", "[IMG_END]"))

    def check_layout(self, ids: list[int], layout: ImageLayout) -> None:
        """[IMG_END] closes the span, and every row has the same number of [IMG] tokens."""
        super().check_layout(ids, layout)
        if layout.eoi is None:
            raise LayoutError("The Pixtral image span is not closed by [IMG_END]; the prompt ends inside the image.")
        bounds = [layout.start - 1, *layout.eol, layout.eoi]
        if len({b - a - 1 for a, b in zip(bounds, bounds[1:])}) != 1:
            raise LayoutError("The Pixtral image rows (between [IMG_BREAK] tokens) are not all of the same width.")

    def raw_prompt(self, text: str, image_first: bool) -> str:
        """The Mistral form, ``[INST]...[/INST]`` (BOS added by the tokenizer)."""
        body = f"{self.image_token}\n{text}" if image_first else f"{text}\n{self.image_token}"
        return f"[INST]{body}[/INST]"
