"""LLaVA-OneVision (``llava_onevision``: SigLIP vision tower + Qwen2 decoder, "anyres" images).

The ``<image>`` placeholder expands to one ``<image>`` token per image feature, in the order the
model packs them: first the base image (the whole image as one crop, ``(image_size /
patch_size)**2`` features), then the high-resolution crops as one grid of feature rows, unpadded
to the image's aspect ratio, each row followed by the learned ``image_newline`` feature.
Every one of these is the image token id, so the rows cannot be read off the ids: `encode`
records each image's size and `layout` places the rows exactly as the model's
``pack_image_features`` does. The newline features are ``eol`` and are not content tokens
(``image[k]`` counts base and grid features only). The span's last token is thus an ``eol``.
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

from transformers.image_processing_utils import select_best_resolution

from .base import Family, ImageLayout, LayoutError


class LlavaOneVision(Family):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    checkpoints = ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava-hf/llava-onevision-qwen2-7b-ov-hf")
    eoi_doc = "No end-of-image token: eoi is the first token after the image tokens."

    def setup(self):
        super().setup()
        self._grids: dict[tuple[int, ...], list[tuple[int, int]]] = {}

    def raw_prompt(self, text, image_first):
        body = f"{self.image_token}\n{text}" if image_first else f"{text}\n{self.image_token}"
        return f"<|im_start|>user {body}<|im_end|>\n<|im_start|>assistant\n"

    # --- the feature grid ----------------------------------------------------------------------
    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the high-resolution feature grid the model packs for an image of this size.

        Mirrors ``LlavaOnevisionModel.pack_image_features``: best grid resolution, unpadding to the
        image's aspect ratio, then downscaling past ``vision_aspect_ratio`` ("anyres_max_N") crops.
        """
        config, vision = self.config, self.config.vision_config
        side = vision.image_size // vision.patch_size  # features per crop side
        grid_h, grid_w = select_best_resolution([height, width], config.image_grid_pinpoints)
        rows, cols = grid_h // vision.image_size * side, grid_w // vision.image_size * side
        if width / height > cols / rows:
            new_rows = int(round(height * (cols / width), 7))
            rows -= 2 * ((rows - new_rows) // 2)
        else:
            new_cols = int(round(width * (rows / height), 7))
            cols -= 2 * ((cols - new_cols) // 2)
        max_crops = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_crops * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    # --- encoding and layout -------------------------------------------------------------------
    def encode(self, images, texts):
        """Encode as usual, remembering each row's feature grid for `layout`."""
        inputs = super().encode(images, texts)
        self._grids = {}
        for row, (h, w) in zip(inputs["input_ids"].tolist(), inputs["image_sizes"].tolist()):
            self._grids.setdefault(tuple(row), []).append(self.feature_grid(h, w))
        return inputs

    def layout(self, ids, first) -> ImageLayout:
        lay = super().layout(ids, first)
        grids = self._grids.get(tuple(ids))
        if not grids:
            raise LayoutError(
                "LLaVA-OneVision rows can only be laid out right after this adapter encoded them (the image "
                "sizes say where the newline features sit); prepare batches with VLM.prepare."
            )
        # Identical rows are laid out in the order they were encoded.
        rows, cols = grids.pop(0) if len(grids) > 1 else grids[0]
        vision = self.config.vision_config
        base = (vision.image_size // vision.patch_size) ** 2
        length = lay.end - lay.start + 1
        if length != base + rows * (cols + 1):
            raise LayoutError(
                f"The LLaVA-OneVision image span has {length} tokens, but the model packs {base} base features and "
                f"{rows} rows of {cols} features plus a newline ({base + rows * (cols + 1)} in all): the processor "
                "and the model config disagree."
            )
        lay.eol = [lay.start + base + (r + 1) * (cols + 1) - 1 for r in range(rows)]
        eol = set(lay.eol)
        lay.content = [p for p in lay.content if p not in eol]
        return lay
