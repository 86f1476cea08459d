"""Chameleon (``chameleon``: facebook/chameleon-7b, facebook/chameleon-30b).

The processor expands ``<image>`` to ``<racm3:break>`` + ``<image>`` x image_seq_length + ``<eoss>``;
inside ``forward`` the VQ-VAE turns the pixels into image token ids (``IMGIMG...`` tokens) whose
embeddings replace the ``<image>`` placeholders. So the image span is the run of ``<image>`` tokens
(all content, no in-image specials, no line breaks), ``boi`` is ``<racm3:break>`` and ``eoi`` is
``<eoss>``.

The checkpoints have no chat template; prompts are written for text completion, with the image
and the text side by side (``<image>{prompt}`` or ``{prompt}<image>``, the form of the model
card). ``return_for_text_completion=True`` stops the processor from appending its separator token
``<reserved08706>`` (chat mode), so a text-first prompt ends with ``<eoss>``.
"""

from __future__ import annotations

from .base import Family, ImageLayout, LayoutError


class Chameleon(Family):
    """Chameleon: the image is a run of ``<image>`` placeholders between ``<racm3:break>`` and ``<eoss>``."""

    name = "chameleon"
    model_types = ("chameleon",)
    checkpoints = ("facebook/chameleon-7b", "facebook/chameleon-30b")
    eoi_doc = "eoi is <eoss>, the end-of-image token the processor writes after the image tokens."
    processor_kwargs = {"return_for_text_completion": True}

    def setup(self) -> None:
        """Also resolves the processor's image start and end tokens as ``boi`` and ``eoi``."""
        self.content_ids = frozenset({self.token_id(self.image_token)})
        self.boi_id = self.token_id(self.processor.image_start_token)  # <racm3:break>
        self.eoi_id = self.token_id(self.processor.image_end_token)  # <eoss>

    def check_layout(self, ids: list[int], layout: ImageLayout) -> None:
        """Also requires both ``boi`` and ``eoi`` around the span."""
        super().check_layout(ids, layout)
        if layout.boi is None or layout.eoi is None:
            raise LayoutError(
                "The chameleon image span is not enclosed by <racm3:break> ... <eoss>; "
                "the processor output does not have the expected layout."
            )
