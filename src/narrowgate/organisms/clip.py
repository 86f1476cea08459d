"""Contrastive (CLIP-style) pre-training of the non-native organism's vision encoder.

A stock `CLIPModel` (ViT vision tower + small text transformer) learns to match each training
image with one of its captions (symmetric InfoNCE over the batch), which aligns the image
representation with text, as the CLIP/SigLIP encoders of LLaVA-style models are. Only the vision
tower is kept; the text tower is a training device.
"""

from __future__ import annotations

import random
from itertools import product

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from ..data.synthetic import COLORS, POSITIONS, SHAPES, Scene, scene_captions
from .common import Phase, batches, pad_rows, run_phase


def vision_config(hidden: int, layers: int, heads: int, image_size: int, patch_size: int) -> CLIPVisionConfig:
    """The ViT vision tower of the non-native organism (MLP 4x ``hidden``): the part of the CLIP model it keeps."""
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )


def new_clip(vision: CLIPVisionConfig, tokenizer, text_hidden: int = 64, text_layers: int = 2) -> CLIPModel:
    """A randomly initialised CLIP of the ``vision`` tower and a small text tower over ``tokenizer``'s vocabulary
    (captions of at most 32 tokens), projecting both to the vision width: the text tower is only a training device."""
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=max(1, text_hidden // 32),
        max_position_embeddings=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=vision.hidden_size)
    return CLIPModel(config)


def train_clip(
    clip: CLIPModel,
    pixels: torch.Tensor,
    scenes,
    tokenizer,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> Phase:
    """Contrastive training on (image, random reference caption + ``</s>``) pairs; returns the phase."""
    rng = random.Random(f"clip-captions:{seed}")
    stream = batches(len(scenes), batch_size, seed + 2)
    captions = {}
    clip.train()

    def text(scene):
        caption = rng.choice(scene_captions(scene))
        if caption not in captions:
            captions[caption] = tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return captions[caption]

    def step(_):
        idx = next(stream)
        ids, mask = pad_rows([text(scenes[i]) for i in idx], tokenizer.pad_token_id)
        return clip(input_ids=ids, attention_mask=mask, pixel_values=pixels[idx], return_loss=True).loss

    phase = run_phase(
        Phase("clip", steps, batch_size, lr), clip.parameters(), step, weight_decay=0.1, progress=progress
    )
    clip.eval()
    return phase


@torch.no_grad()
def retrieval_accuracy(clip: CLIPModel, pixels: torch.Tensor, scenes, tokenizer) -> dict:
    """Image -> caption retrieval among the captions of all 324 scene kinds; accuracy per attribute and exact."""
    kinds = [Scene(s, c, p, 64, 0.0, 0.0, 1.0) for s, c, p in product(SHAPES, COLORS, POSITIONS)]
    rows = [
        tokenizer(scene_captions(k)[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for k in kinds
    ]
    ids, mask = pad_rows(rows, tokenizer.pad_token_id)
    text = nn.functional.normalize(clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
    image = nn.functional.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    best = [kinds[j] for j in (image @ text.T).argmax(-1).tolist()]
    scores = {
        a: sum(getattr(b, a) == getattr(s, a) for b, s in zip(best, scenes)) / len(scenes)
        for a in ("color", "shape", "position")
    }
    scores["all"] = sum(
        (b.color, b.shape, b.position) == (s.color, s.shape, s.position) for b, s in zip(best, scenes)
    ) / len(scenes)
    return {k: round(float(v), 4) for k, v in scores.items()}
