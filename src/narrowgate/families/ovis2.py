"""Ovis2 (``ovis2``: SigLIP-like tower, probabilistic visual tokenizer, Qwen2 decoder).

The prompt's ``<image>`` expands to ``<IMG_START>``, ``image_seq_length`` ``<IMG_ATOM>`` tokens for the whole
image and ``<IMG_GRID>``, then (for an image cut into an R x C grid of crops) the crops' ``<IMG_ATOM>`` runs
separated by ``<IMG_COL>`` within a row and ``<IMG_ROW>`` between rows, and ``<IMG_END>``. The model fills the
``<IMG_ATOM>`` tokens (``config.image_token_id``) with image features and the five indicator tokens with fixed
embeddings of its visual vocabulary, the same for every image. The processor names only the ``<image>``
placeholder, so these tokens are named here: ``boi`` is ``<IMG_START>``, ``eoi`` is ``<IMG_END>``, and the span
between them holds the atoms and the grid, column and row indicators (in-image specials). Everything else is the
generic adapter's, but a shared prefix must hold ``<IMG_END>``: the model writes its indicator embedding only
in a forward that has the image, so a suffix pass would see the plain token embedding there.
"""

from __future__ import annotations

from .base import Inputs
from .generic import Generic


class Ovis2(Generic):
    """Ovis2: the generic adapter with ``<IMG_START>`` / ``<IMG_END>`` named; no shared prefix before ``<IMG_END>``."""

    name = "ovis2"
    model_types = ("ovis2",)
    checkpoints = ("thisisiron/Ovis2-1B-hf", "thisisiron/Ovis2-2B-hf")
    eoi_doc = "eoi is <IMG_END>, the indicator token that closes the image."

    def setup(self) -> None:
        """The generic setup, then ``<IMG_START>`` / ``<IMG_END>`` (unnamed by the processor) as ``boi`` / ``eoi``."""
        super().setup()
        self.boi_id, self.eoi_id = self.token_id("<IMG_START>"), self.token_id("<IMG_END>")
        self.eoi_doc = type(self).eoi_doc

    def causal_from(self, inputs: Inputs) -> int:
        """Past the last ``<IMG_END>``: its embedding comes from the image pass (see the module docstring)."""
        ends = (inputs["input_ids"] == self.eoi_id).nonzero()
        return max(super().causal_from(inputs), int(ends[:, 1].max()) + 1 if len(ends) else 0)
