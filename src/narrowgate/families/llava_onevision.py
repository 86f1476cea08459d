"""LLaVA-OneVision (``llava_onevision``: SigLIP vision tower + Qwen2 decoder, "anyres" images).

The ``<image>`` placeholder expands to one ``<image>`` token per image feature, in the order the
model packs them: first the base image (the whole image as one crop, ``(image_size /
patch_size)**2`` features), then the high-resolution crops as one grid of feature rows, unpadded
to the image's aspect ratio, each row followed by the learned ``image_newline`` feature.
Every one of these is the image token id, so the rows cannot be read off the ids: `layouts`
places the rows from each image's size exactly as the model's
``pack_image_features`` does (shared with LLaVA-NeXT in `anyres`; OneVision also downscales
grids past ``vision_aspect_ratio`` crops). The newline features are ``eol`` and are not content tokens
(``image[k]`` counts base and grid features only). The span's last token is thus an ``eol``.
In a prompt holding several images each image is its base features and one newline only (no grid), and a
video is its frames' pooled features (``(side / 2)**2`` each, frame after frame) and one newline.
There is no image-start or end-of-image token: ``eoi`` is the first token after the image (in
the llava-hf chat template, the newline after ``<image>``). The Qwen2 tokenizer has no BOS
token, so ``bos`` is empty.
Chat template (llava-hf): ``<|im_start|>user <image>\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``;
it renders a message's images before its text whatever their order, so there a text-first
prompt still has the image first.
Raw template (no chat template): that same string, with the image and text in the order asked.
"""

from __future__ import annotations

import math

from .anyres import AnyresFamily, unpadded_grid


class LlavaOneVision(AnyresFamily):
    """LLaVA-OneVision: anyres image features, large grids downscaled, only a lone image patched."""

    name = "llava_onevision"
    title = "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    checkpoints = ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava-hf/llava-onevision-qwen2-7b-ov-hf")
    eoi_doc = "No end-of-image token: eoi is the first token after the image tokens."

    def raw_prompt(self, text: str, image_first: bool) -> str:
        """The llava-hf chat template's form, ``<|im_start|>user ...<|im_end|>``."""
        body = f"{self.image_token}\n{text}" if image_first else f"{text}\n{self.image_token}"
        return f"<|im_start|>user {body}<|im_end|>\n<|im_start|>assistant\n"

    def patched(self, images: int) -> bool:
        """A prompt holding several images gets each one's base features and one newline only (the model's
        ``batch_num_images``)."""
        return images == 1

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the high-resolution feature grid the model packs for an image of this size.

        Mirrors ``LlavaOnevisionModel.pack_image_features``: best grid resolution, unpadding to the
        image's aspect ratio, then downscaling past ``vision_aspect_ratio`` ("anyres_max_N") crops.
        """
        config, side = self.config, self.crop_side
        rows, cols = unpadded_grid(height, width, config.image_grid_pinpoints, config.vision_config.image_size, side)
        max_crops = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_crops * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols
