"""Janus / Janus-Pro (``janus``: SigLIP-like understanding tower + aligner, Llama decoder).

The ``<image_placeholder>`` in the prompt expands to ``<begin_of_image>``, then one
``<image_placeholder>`` per vision patch (``num_image_tokens``, 576 in Janus-Pro), then
``<end_of_image>``. ``boi`` is ``<begin_of_image>`` and ``eoi`` is ``<end_of_image>``; no in-image
line breaks. The VQ model of the checkpoint is only used for image generation and plays no part here.
The processor itself prepends the default system prompt when ``use_default_system_prompt`` is set
(the case for deepseek-community checkpoints), after which the tokenizer adds BOS.
Raw template (no chat template): ``<|User|>: <image_placeholder>\\n{prompt}\\n\\n<|Assistant|>:``.
"""

from __future__ import annotations

from .base import Family, ImageLayout, LayoutError


class Janus(Family):
    """Janus / Janus-Pro: the image is a run of placeholders between ``<begin_of_image>`` and ``<end_of_image>``."""

    name = "janus"
    model_types = ("janus",)
    checkpoints = ("deepseek-community/Janus-Pro-1B", "deepseek-community/Janus-Pro-7B")
    eoi_doc = "The <end_of_image> token that closes the image span."

    def setup(self) -> None:
        """Also resolves the processor's image start and end tokens as ``boi`` and ``eoi``."""
        self.content_ids = frozenset({self.token_id(self.image_token)})
        self.boi_id = self.token_id(self.processor.image_start_token)
        self.eoi_id = self.token_id(self.processor.image_end_token)

    def raw_prompt(self, text: str, image_first: bool) -> str:
        """The Janus form, ``<|User|>: ... <|Assistant|>:``."""
        body = f"{self.image_token}\n{text}" if image_first else f"{text}\n{self.image_token}"
        return f"<|User|>: {body}\n\n<|Assistant|>:"

    def check_layout(self, ids: list[int], layout: ImageLayout) -> None:
        """Also requires both ``boi`` and ``eoi`` around the span."""
        super().check_layout(ids, layout)
        if layout.boi is None:
            raise LayoutError(
                "The Janus image span is not preceded by <begin_of_image>; the processor output does not have "
                "the expected layout."
            )
        if layout.eoi is None:
            raise LayoutError("The Janus image span is not followed by <end_of_image>.")
