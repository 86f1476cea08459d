"""LLaVA-1.5 (``llava`` with a CLIP vision tower).

The ``<image>`` placeholder expands to one ``<image>`` token per projected patch; there is no
image-start or end-of-image token, so ``eoi`` is the first token after the image (in the
llava-hf chat template, the newline that follows it). No in-image line breaks.
Raw template (no chat template): ``USER: <image>\\n{prompt} ASSISTANT:``.
"""

from __future__ import annotations

from .base import Family


class Llava(Family):
    """LLaVA-1.5: the image is a run of ``<image>`` tokens with nothing around it."""

    name = "llava"
    model_types = ("llava",)
    checkpoints = ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf")
    eoi_doc = "No end-of-image token: eoi is the first token after the image tokens."

    @classmethod
    def accepts(cls, vision_model_type: str | None) -> bool:
        """Every ``llava`` model but those with a Pixtral tower (the `Pixtral` adapter's)."""
        return vision_model_type != "pixtral"

    def raw_prompt(self, text: str, image_first: bool) -> str:
        """The llava-hf form, ``USER: ... ASSISTANT:``."""
        body = f"{self.image_token}\n{text}" if image_first else f"{text}\n{self.image_token}"
        return f"USER: {body} ASSISTANT:"
