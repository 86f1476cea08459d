"""Tiny hybrid decoders: Qwen 3.5 and Qwen 3.5 MoE, Gated DeltaNet (linear attention) layers beside attention.

Four decoder layers, ``linear, linear, full, linear`` (the real checkpoints put one attention layer after
every three Gated DeltaNet layers; here a linear layer also follows the attention one). The vision tower and
processor are Qwen2-VL-sized as in tests/fixtures/qwen2_vl.py (4 px patches merged 2x2), and the chat
template frames the image by ``<|vision_start|>`` and ``<|vision_end|>`` as Qwen's do. Kept out of
tests/fixtures/, whose families every engine test runs on: a hybrid decoder refuses what needs attention in
every layer (attention statistics, ``head``/``pattern`` hooks, the shared prefix).
"""

from __future__ import annotations

import torch
from transformers import (
    Qwen2VLImageProcessorPil,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from tests.fixtures.common import make_tokenizer, save
from tests.fixtures.qwen2_vl import CHAT_TEMPLATE, MAX_PIXELS, MERGE, MIN_PIXELS, PATCH, SPECIAL

TYPES = ("qwen3_5", "qwen3_5_moe")
LAYER_TYPES = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]


def processor():
    tok = make_tokenizer(SPECIAL, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    sizes = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, merge_size=MERGE)
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**sizes, temporal_patch_size=2),
        video_processor=Qwen3VLVideoProcessor(**sizes, temporal_patch_size=2),
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
    )


def text_config(tok, moe: bool) -> dict:
    out = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=LAYER_TYPES,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
        },
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if moe:
        out.update(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
        del out["intermediate_size"]
    return out


def build(path, model_type: str = "qwen3_5", seed: int = 0):
    """A tiny ``model_type`` checkpoint (`TYPES`) saved in ``path``."""
    torch.manual_seed(seed)
    proc = processor()
    tok = proc.tokenizer
    moe = model_type == "qwen3_5_moe"
    config_cls, model_cls = (
        (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration)
        if moe
        else (Qwen3_5Config, Qwen3_5ForConditionalGeneration)
    )
    ids = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    config = config_cls(
        text_config=text_config(tok, moe),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=2,
            out_hidden_size=64,
        ),
        **{k: tok.convert_tokens_to_ids(v) for k, v in ids.items()},
    )
    model = model_cls(config).eval()
    with torch.no_grad():  # a trained model's gates: varied decays and write strengths, not the initial ones
        for layer in model.model.language_model.layers:
            mixer = getattr(layer, "linear_attn", None)
            if mixer is not None:
                mixer.A_log.uniform_(-2.0, 1.0)
                mixer.dt_bias.normal_(0.0, 1.0)
                mixer.norm.weight.normal_(1.0, 0.2)
    return save(path, model, proc)
