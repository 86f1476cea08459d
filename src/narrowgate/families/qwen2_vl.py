"""Qwen2-VL and Qwen2.5-VL (``qwen2_vl``, ``qwen2_5_vl``: ViT with a 2x2 patch merger, Qwen2 decoder).

The prompt carries ``<|vision_start|><|image_pad|><|vision_end|>``; the processor expands the one
``<|image_pad|>`` to one per merged patch, ``(h / 28) * (w / 28)`` for the real 14-px patches, so
the span length depends on the image size. ``boi`` is ``<|vision_start|>`` and ``eoi`` is
``<|vision_end|>``; no in-image line breaks: rows are encoded by M-RoPE's 3-D position ids,
which `position_ids` takes from the model's own ``get_rope_index``. Several images are written back to back,
each between its own start and end. A video is ``<|vision_start|><|video_pad|><|vision_end|>``, expanded to
``(T / 2) * (h / 28) * (w / 28)`` tokens, one temporal patch (two input frames, ``temporal_patch_size``) after
the other: each temporal patch is a frame (``frame@t``). Qwen tokenizers have
no BOS token, so the ``bos`` role is empty.
Raw template (no chat template):
``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import torch

from .base import Family, ImageLayout, Inputs, LayoutError

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


class Qwen2VL(Family):
    """Qwen2-VL / Qwen2.5-VL: each image or video between ``<|vision_start|>`` and ``<|vision_end|>``; M-RoPE."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    checkpoints = (
        "Qwen/Qwen2-VL-2B-Instruct",
        "Qwen/Qwen2-VL-7B-Instruct",
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
    )
    eoi_doc = "The <|vision_end|> token that closes the image span."

    def setup(self) -> None:
        """Also resolves ``<|vision_start|>`` and ``<|vision_end|>`` as ``boi`` and ``eoi``."""
        self.content_ids = frozenset({self.token_id(self.image_token)})
        self.boi_id = self.token_id(VISION_START)
        self.eoi_id = self.token_id(VISION_END)

    def raw_prompt(self, text: str, image_first: bool) -> str:
        """The Qwen chat form, ``<|im_start|>user ...<|im_end|>``, the image wrapped in its vision tokens."""
        image = self.visual_text("image")
        body = f"{image}{text}" if image_first else f"{text}{image}"
        return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"

    def visual_text(self, kind: str) -> str:
        """An image or a video as the chat template writes it: its placeholder between the vision start and end."""
        return f"{VISION_START}{super().visual_text(kind)}{VISION_END}"

    def attach(self, model: torch.nn.Module) -> None:
        """Keeps the model's ``get_rope_index`` for `position_ids`."""
        self.model_positions(model)

    def position_ids(self, inputs: Inputs) -> torch.Tensor | None:
        """M-RoPE positions ``[3, B, T]`` (temporal, height, width) from the model's own ``get_rope_index``.

        Text tokens get the same position in all three rows, counted from each row's first real token; each image's
        (and video's) tokens get ``start + (t, i, j)`` for merged patch (i, j) of temporal patch t; text after it
        resumes past its largest. Explicit positions keep forward, generate and shared-prefix runs (which feed the
        model a suffix on a KV cache) independent of the model's internal ``rope_deltas`` state.
        """
        if inputs.get("attention_mask") is None:
            return None
        return self.rope_positions(inputs)

    def check_layout(self, ids: list[int], layout: ImageLayout) -> None:
        """Also requires both ``boi`` and ``eoi`` around the span."""
        super().check_layout(ids, layout)
        if layout.boi is None:
            raise LayoutError(
                f"The {self.name} image span is not preceded by {VISION_START}: the prompt must wrap the image "
                f"token as {VISION_START}{self.image_token}{VISION_END}."
            )
        if layout.eoi is None:
            raise LayoutError(f"The {self.name} image span is not followed by {VISION_END}.")
