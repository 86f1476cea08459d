"""LLaVA-NeXT / LLaVA-1.6 (``llava_next``: CLIP vision tower + Mistral or Vicuna (Llama) decoder, "anyres").

The ``<image>`` placeholder expands to one ``<image>`` token per image feature, in the order the
model packs them: first the base image (the whole image resized to one crop, ``(image_size /
patch_size)**2`` features, the CLS feature dropped), then the high-resolution crops as one grid of
feature rows, unpadded to the image's aspect ratio, each row followed by the learned
``image_newline`` feature. The layout is OneVision's without its downscaling of large grids
(shared in `anyres`): `layouts` places the rows from each image's size exactly as
``LlavaNextModel.pack_image_features`` does. The newline features are ``eol`` and are not content
tokens (``image[k]`` counts base and grid features only); the span's last token is an ``eol``.
There is no image-start or end-of-image token: ``eoi`` is the first token after the image (in
the llava-hf chat templates, the newline after ``<image>``).
Chat templates (llava-hf): Mistral ``[INST] <image>\\n{prompt} [/INST]``, Vicuna
``... USER: <image>\\n{prompt} ASSISTANT:``; both render a message's images before its text.
Raw template (no chat template): the Mistral one, with the image and text in the order asked.
"""

from __future__ import annotations

from .anyres import AnyresFamily, unpadded_grid


class LlavaNext(AnyresFamily):
    """LLaVA-NeXT: anyres image features, every image of a prompt patched."""

    name = "llava_next"
    title = "LLaVA-NeXT"
    model_types = ("llava_next",)
    checkpoints = ("llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf")
    eoi_doc = "No end-of-image token: eoi is the first token after the image tokens."

    def raw_prompt(self, text: str, image_first: bool) -> str:
        """The Mistral form, ``[INST] ... [/INST]``."""
        body = f"{self.image_token}\n{text}" if image_first else f"{text}\n{self.image_token}"
        return f"[INST] {body} [/INST]"

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the high-resolution feature grid the model packs for an image of this size.

        Mirrors ``LlavaNextModel.pack_image_features``: best grid resolution among
        ``image_grid_pinpoints``, then unpadding to the image's aspect ratio.
        """
        config = self.config
        return unpadded_grid(
            height, width, config.image_grid_pinpoints, config.vision_config.image_size, self.crop_side
        )
