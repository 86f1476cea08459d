"""Qwen2-VL and Qwen2.5-VL (``qwen2_vl``, ``qwen2_5_vl``: ViT with a 2x2 patch merger, Qwen2 decoder).

The prompt carries ``<|vision_start|><|image_pad|><|vision_end|>``; the processor expands the one
``<|image_pad|>`` to one per merged patch, ``(h / 28) * (w / 28)`` for the real 14-px patches, so
the span length depends on the image size. ``boi`` is ``<|vision_start|>`` and ``eoi`` is
``<|vision_end|>``; no in-image line breaks: rows are encoded by M-RoPE's 3-D position ids,
which `position_ids` builds exactly as the model's ``get_rope_index`` does. Qwen tokenizers have
no BOS token, so the ``bos`` role is empty.
Raw template (no chat template):
``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import torch

from .base import Family, LayoutError

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


class Qwen2VL(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    checkpoints = (
        "Qwen/Qwen2-VL-2B-Instruct",
        "Qwen/Qwen2-VL-7B-Instruct",
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
    )
    eoi_doc = "The <|vision_end|> token that closes the image span."

    def setup(self):
        self.content_ids = frozenset({self.token_id(self.image_token)})
        self.boi_id = self.token_id(VISION_START)
        self.eoi_id = self.token_id(VISION_END)

    def raw_prompt(self, text, image_first):
        image = f"{VISION_START}{self.image_token}{VISION_END}"
        body = f"{image}{text}" if image_first else f"{text}{image}"
        return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"

    def position_ids(self, inputs):
        """M-RoPE positions ``[3, B, T]`` (temporal, height, width), as the model's ``get_rope_index`` builds them.

        Text tokens get the same position in all three rows, counted from each row's first real
        token; the image's tokens get ``start + (t, i, j)`` for merged patch (i, j); text after the
        image resumes at ``start + max(h, w)``. Explicit positions keep forward, generate and
        shared-prefix runs (which feed the model a suffix on a KV cache) independent of the
        model's internal ``rope_deltas`` state.
        """
        grids, mask = inputs.get("image_grid_thw"), inputs.get("attention_mask")
        if grids is None or mask is None:
            return None
        ids = inputs["input_ids"]
        merge = self.config.vision_config.spatial_merge_size
        content = torch.tensor(sorted(self.content_ids), device=ids.device)
        pos = torch.zeros(3, *ids.shape, dtype=torch.long, device=ids.device)
        for b in range(ids.shape[0]):  # one image per example, so grids[b] is example b's grid
            real = mask[b].bool()
            row = ids[b][real]
            start = int(torch.isin(row, content).nonzero()[0])
            t, h, w = int(grids[b][0]), int(grids[b][1]) // merge, int(grids[b][2]) // merge
            image = torch.stack(torch.meshgrid(*(torch.arange(n) for n in (t, h, w)), indexing="ij")).reshape(3, -1)
            after = row.numel() - start - image.shape[1]
            before = torch.arange(start).expand(3, -1)
            text_after = torch.arange(after).expand(3, -1) + start + max(h, w)
            pos[:, b, real] = torch.cat([before, image + start, text_after], dim=1).to(ids.device)
        return pos

    def check_layout(self, ids, layout):
        super().check_layout(ids, layout)
        if layout.boi is None:
            raise LayoutError(
                f"The {self.name} image span is not preceded by {VISION_START}: the prompt must wrap the image "
                f"token as {VISION_START}{self.image_token}{VISION_END}."
            )
        if layout.eoi is None:
            raise LayoutError(f"The {self.name} image span is not followed by {VISION_END}.")
