"""LightOnOCR (``lighton_ocr``: Pixtral vision tower, patch merger, Qwen3 decoder).

The processor replaces its ``image_token`` (``<|image_pad|>``) by one run of image tokens, one per merged patch,
and writes nothing around it: the ``image_break_token`` and ``image_end_token`` its tokenizer names (Pixtral's
names; Pixtral's processor writes them) never appear in a prompt, so reading them as the generic adapter does would
expect an end-of-image token that is not there. The span is the run of image tokens and ``eoi`` is the first token
after it (the chat template's line break before the prompt: ``<|im_start|>user\\n<|image_pad|>...\\n{prompt}``);
everything else is the generic adapter's.
"""

from __future__ import annotations

from .generic import Generic


class LightOnOcr(Generic):
    """LightOnOCR: the generic adapter without the Pixtral break and end tokens its tokenizer names but never writes."""

    name = "lighton_ocr"
    model_types = ("lighton_ocr",)
    checkpoints = ("lightonai/LightOnOCR-1B-1025", "lightonai/LightOnOCR-2-1B")
    eoi_doc = "No end-of-image token is written: eoi is the first token after the image tokens."

    def setup(self) -> None:
        """The generic setup, then no ``boi``, ``eoi`` or line breaks (see the module docstring)."""
        super().setup()
        self.boi_id = self.eoi_id = None
        self.special_ids = self.eol_ids = frozenset()
        self.eoi_doc = type(self).eoi_doc
