"""Coverage matrix: every model type transformers maps to AutoModelForImageTextToText, built tiny and checked.

For each type: a tiny random checkpoint from the type's own config class (default config, widths and depths
shrunk, sliding windows and attention chunks shortened so they bind on short prompts) and its own processor
class (default image processor, a locally trained tokenizer holding every special token the processor names),
saved and loaded back with `narrowgate.load` (a type with a tiny checkpoint in tests/fixtures/ uses that one).
Where a class's defaults build no working model, `CHECKPOINT` holds the values its checkpoints have,
`WORKAROUND` the values that avoid a named transformers bug, `TOKENS` the tokens a config's id fields name, and
`TIMM` small versions of timm-backed towers. Then the checks:

- roles: every role found; the image span covers every token the model replaces with image features;
- blind: a mask-mode image -> (eoi, text) knockout makes the text logits of two different images identical
  (and they differ without it);
- reference: eoi -> text knockouts (mask and zero mode, every layer) equal the independent float64 eager
  reference of tests/engine/reference.py (on a hybrid decoder, its recurrent layers written out by hand:
  tests/engine/recurrent_reference.py);
- capture: captured residuals equal the model's own ``output_hidden_states``;
- prefix: `VLM.forward_conditions` (the shared prefix) equals one separate forward per condition (a hybrid
  decoder shares no prefix: there each condition runs whole, and the check holds that to separate forwards).

Where the text config has ``attn_logit_softcapping`` (off in Gemma 3's default), every check runs once more on a
copy with soft-capping on, under eager attention (transformers' SDPA refuses soft-capping): check ``softcap``.

Two more columns ask the questions of several images and video (issue 29), with the checks the family tests share
(tests/families/several_checks.py), on the same loaded checkpoint:

- multi-image: two images in one prompt: each image's content tokens hold the model's own features of that image
  prepared alone, the roles of each image (``image@2``, ``eoi@2``...) resolve where its tokens are, per-image
  knockouts (``image@2 -> text``...) in both modes equal the float64 eager reference, a patch at ``eoi@1`` equals a
  forward pre-hook, and ``image@1`` knocked out from everything after it leaves the text blind to image 1. A family
  that lays out one image per prompt shows its refusal ("refused: ...");
- video: a short synthetic clip: ``frame@t`` are the model's frames (editing the last input frame changes the
  embeddings of ``frame@-1``'s tokens and no other), per-frame knockouts equal the eager reference, the gate scan's
  batched knockouts equal separate forwards, and ``frame@1`` knocked out leaves the text blind to the first frame.
  A type whose processor takes no video shows "n/a" (the architecture takes none), apart from a refusal or failure.

Each type runs in its own process (6 GiB of address space, 150 s for the checks above, 150 s more for the two
columns); a failure costs only its type (or only its column): the failure is recorded, after its cause where `KNOWN`
names it, and the run goes on. Usage: ``python scripts/coverage.py [--types a,b,c] [--markdown]``; the last lines
count the types passing each column, and the very last reads ``coverage: N of M model types pass every check``
(every check above the two columns).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import math
import multiprocessing
import re
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from narrowgate import threads

threads.configure()  # before torch loads: idle OpenMP threads sleep; the forked checks inherit the policy

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.feature_extraction_auto import (
    FEATURE_EXTRACTOR_MAPPING_NAMES,
)
from transformers.models.auto.image_processing_auto import (
    IMAGE_PROCESSOR_MAPPING_NAMES,
    get_image_processor_class_from_name,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

import narrowgate as ng
from narrowgate.errors import NarrowgateError
from narrowgate.families import (
    Generic,
    LayoutError,
    UnsupportedModelError,
    detect,
    out_of_scope,
    refusal,
)
from narrowgate.families.generic import (
    BOI_ID_NAMES,
    BOI_NAMES,
    EOI_ID_NAMES,
    EOI_NAMES,
    IMAGE_ID_NAMES,
    wants_mm_token_types,
)
from tests.engine import reference
from tests.families import several_checks as several
from tests.fixtures.common import CHAT_TEMPLATE, PROMPTS, images, make_tokenizer

CHECKS = ("roles", "blind", "reference", "capture", "prefix")
#: Columns asking the questions of several images and video, each passed ("yes"), not applicable, refused or failed.
COLUMNS = ("multi-image", "video")
ATOL = 1e-5
SECONDS_PER_TYPE = 150
#: Seconds for the two columns, after the checks (whose results are in by then).
SECONDS_COLUMNS = 150
#: A column's cell for a type that never reached it (not built, not loaded, out of time before it began).
UNREACHED = "—"
MEMORY = 6 << 30
#: Attention-logit soft-cap, small enough to bind on a tiny random model's logits.
SOFTCAP = 0.1

#: Sizes given to the text config and to every other sub-config, where the config has the field (with that type).
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "sliding_window": 8,
    "attention_chunk_size": 8,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,  # MLA: keys 16 + 8 wide, values 16, in the checkpoints' 3 : 2 (DeepSeek-V3: 192, 128)
    "v_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "hidden_size_per_layer_input": 16,
    # Granite's readout temperature: a checkpoint's 4 divides a 4-layer random model's logits so far that zeroing
    # one position moves them less than the matrix can tell from rounding (1e-4); the attention path is unchanged.
    "logits_scaling": 1.0,
}
VISION = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "depth": 2,
    "num_attention_heads": 2,
    "num_heads": 2,
    "num_key_value_heads": 2,
    "embed_dim": 32,
    "head_dim": 16,
    "projection_dim": 64,
    "out_hidden_size": 64,
    "vision_output_dim": 64,
    "text_hidden_size": 64,
    "projector_input_dim": 64,
    "projector_output_dim": 64,
    "deepstack_visual_indexes": [0, 1],
}
#: Values a type's checkpoints hold (their config.json) where its config class's defaults build no working model,
#: merged into the default config before shrinking.
CHECKPOINT = {
    # tencent/HunyuanOCR: XD-RoPE over (sequence, width, height, image index), 16 half-dimensions each of 64.
    "hunyuan_vl": {"text_config": {"rope_parameters": {"mrope_section": [16, 16, 16, 16]}}},
    # rhymes-ai/Aria: a 14-px-patch SigLIP tower on 980-px images (the projector's query table is keyed by its
    # patch counts, (490 / 14)**2 and (980 / 14)**2; the class default's 32-px patches give neither).
    "aria": {"vision_config": {"patch_size": 14, "image_size": 980}},
    # thisisiron/Ovis2-1B-hf: 448-px tiles of 14-px patches merged 2 x 2, the 256 tokens its processor writes per tile.
    "ovis2": {"vision_config": {"image_size": 448, "patch_size": 14, "hidden_stride": 2}},
    # CohereLabs/North-Micro-Vision-Instruct: RoPE per layer type, as its rotary embedding reads it (the class
    # default leaves rope_parameters empty, so no model builds); the sections are its code's default.
    "cohere_compass": {
        "text_config": {
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [24, 20, 20]}
            }
        }
    },
    # facebook/Perception-LM-1B: timm's PE ViT without its pooling head (the class default, timm's resnet50, has no
    # token features), projected tokens pooled 2 x 2 as its processor counts them.
    "perception_lm": {
        "projector_pooling_ratio": 2,
        "vision_config": {
            "architecture": "vit_pe_core_large_patch14_336",
            "model_args": {"global_pool": "", "use_post_transformer_norm": False, "init_values": 0.1},
        },
    },
}
#: Config values that work around a transformers bug, merged as `CHECKPOINT`'s are, each naming the failing call.
WORKAROUND = {
    # Step3p7TextModel.forward always calls create_sliding_window_causal_mask, which raises while sliding_window is
    # unset (the class default, with no sliding layer): any window serves, as no layer of this config reads it.
    "step3p7": {"text_config": {"sliding_window": 8}},
}
#: Config token fields that hold another token than the one the builder's rules pick (the processor's own
#: ``image_token``, or a ``<|field|>`` token), given as token strings (a list for a list of ids).
TOKENS = {
    # Ovis2 (thisisiron/Ovis2-1B-hf's ids, in this order): the prompt's <image> expands to <IMG_START> <IMG_ATOM>...
    # <IMG_GRID> ... <IMG_END>; the model fills the <IMG_ATOM> tokens with image features, the indicator tokens with
    # its visual indicator embeddings.
    "ovis2": {
        "image_token_id": "<IMG_ATOM>",
        "visual_indicator_token_ids": ["<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"],
    },
}
#: Small versions of the timm towers that timm-backed vision configs name (their widths are timm's, which the VISION
#: table cannot reach): timm constructor arguments, the image side given to the image processor (and the tower),
#: and the tower's patch size where the processor asks for it.
TIMM = {
    # Gemma 3n's MobileNet-V5 with 1/8 of its channels inside: its multi-scale fusion still gives 2048 x 16 x 16
    # features (one per image token) from any side, so a 128-px image serves.
    "mobilenetv5_300m_enc": ({"channel_multiplier": 0.125}, 128, None),
    # PerceptionLM's PE ViT: a 56-px tile is 4 x 4 patches, 2 x 2 image tokens after the 2 x 2 pooling.
    "vit_pe_core_large_patch14_336": (
        {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": [56, 56], "ref_feat_shape": [4, 4]},
        56,
        14,
    ),
}
#: What a type's failure means, where it is known.
KNOWN = {
    # transformers
    "llama4": "transformers bug: Llama4ForConditionalGeneration.forward reads `image_outputs` from the language "
    "model's output, so no forward with an image runs (chunked attention therefore unchecked)",
    "granite4_vision": "transformers: the class default builds no model (Granite4VisionModel.__init__ calls len() on "
    "deepstack_layer_map, None by default); its checkpoints feed vision features into decoder layers up to 21",
    "instructblip": "transformers bug: InstructBlipProcessor.__call__ reads self.image_token.content, which fails "
    "(AttributeError: 'str' object has no attribute 'content') when the tokenizer names its image_token, a str in "
    "transformers 5",
    "instructblipvideo": "a video model: its config names a video token (video_token_index), no image token",
    "shieldgemma2": "not a prompted model: ShieldGemma2Processor.__call__ ignores the text and writes one fixed policy "
    "prompt per image and policy (a classifier)",
    "diffusion_gemma": "not a decoder-only model: its answer comes from a block-diffusion decoder that reads the "
    "prompt's cache bidirectionally (DiffusionGemmaDecoderTextAttention.is_causal = False)",
    "blip": "not a decoder-only model: BLIP's text decoder reads the image through cross-attention",
    "idefics": "not a decoder reading image tokens: IDEFICS reads the image through gated cross-attention layers",
    "git": "no image tokens: GIT puts the image's embeddings before the text's, with no placeholder in input_ids",
    "kosmos-2": "no image tokens: Kosmos-2 places the image by image_embeds_position_mask, not by a token id",
    "kosmos-2.5": "no image tokens: Kosmos-2.5 places the image by image_embeds_position_mask, not by a token id",
    # hybrid decoders (issue 29, item 3)
    "nemotron_h_omni": "hybrid decoder: Nemotron-H's Mamba-2 layers have no attention to knock out",
    "lfm3_vl": "hybrid decoder: LFM3's short-convolution layers have no attention to knock out",
    "glm5_next": "hybrid decoder: linear-attention layers beside DeepSeek-sparse ones (and its validator refuses the "
    "shrunk rotary width of the sparse layers)",
    "qwen4_exp": "hybrid decoder: linear-attention layers (and the class default builds no model: its QSA indexer "
    "divides token_budget by compress_ratio, both None)",
    **{
        t: "hybrid decoder: short causal convolutions (attn_sconv, mlp_sconv) mix positions beside attention in "
        "every layer, so no attention knockout is exact (and the builder's vocabulary is smaller than the "
        "unembedding's padding)"
        for t in ("inkling2", "inkling2_loop", "inkling_mm_model")
    },
    # narrowgate
    "gemma3n": "narrowgate: AltUp carries 4 residual streams between decoder layers ([4, B, T, D]), which captures "
    "and patches refuse; knockouts are exact (roles, blind, reference pass)",
    "hy_v4_vl": "narrowgate: its attention takes attention sinks (s_aux), which narrowgate's attention does not "
    "implement and refuses by name; and hyper-connections carry 4 residual streams between decoder layers "
    "([B, T, 4, D]), which captures and patches refuse",
    "mistral_large4": "narrowgate: DeepSeek sparse attention needs an indexer cache, which the shared prefix (a plain "
    "DynamicCache) lacks; and an attention knockout is exact only while its indexer keeps every key (prompts "
    "shorter than index_topk, as here)",
    "molmo2": "narrowgate has no Molmo 2 adapter: its image is two framed blocks (low- and high-resolution crops), "
    "and its config names the patch token image_patch_id, which the builder does not set",
    "fuyu": "narrowgate has no Fuyu adapter: FuyuProcessor writes the image before the prompt itself (a placeholder "
    "in the prompt makes a second) and drops the image tokenization's first token as SentencePiece's '▁', which "
    "the builder's tokenizer does not write",
    # the builder
    "apertus1p5": "builder: its images are VQ codes at fixed vocabulary offsets (as its audio), which a small "
    "tokenizer cannot hold (its validator refuses the shrunk vocabulary)",
    "pp_chart2table": "builder: its processor writes no image tokens (the checkpoint's chat template spells them out)",
    "dots3_note": "builder: its per_layer_config is keyed by the real model's 46 layers and does not shrink to a "
    "stack whose layers of one type agree, as its validator demands (its DeepSeek-sparse layers would then meet "
    "mistral_large4's shared-prefix gap)",
    "deepseek_vl_hybrid": "slow: its SAM tower runs on 1024-px images, about 50 s of CPU, which a busy machine "
    "stretches past the 150 s limit (run alone it passes every check)",
    **{
        t: "builder: its vision config nests a SAM tower and a second (LM-sized) encoder, which the builder does not "
        "shrink, so the tower runs past the matrix's 6 GiB / 150 s"
        for t in ("deepseek_ocr2", "unlimited_ocr")
    },
}
#: Special-token-like string literals in a processor's source: <tok>, <|tok|>, [TOK], |TOK| (Fuyu's).
_LITERAL = re.compile(r"""["'](<\|?[A-Za-z_][\w:. -]{0,40}\|?>|\[[A-Z][A-Z_]{1,30}\]|\|[A-Z][A-Z_]{1,30}\|)["']""")
_TOKENIZER_ATTR = re.compile(r"""tokenizer\.(\w+_token)\b|getattr\(tokenizer, ["'](\w+_token)["']""")


# --- building ------------------------------------------------------------------------------------
def _cycle(values: list, n: int) -> list:
    """A per-layer list shortened to ``n`` layers, keeping every kind it had (sliding and global, ...)."""
    kinds = list(dict.fromkeys(values))
    out = [kinds[i % len(kinds)] for i in range(n)]
    return out


def _shrink(cfg, table: dict, vocab: int | None, softcap: float | None = None):
    """A config of ``cfg``'s class with ``table``'s sizes where it has those fields, per-layer lists cut to match."""
    d = cfg.to_dict()
    small = {k: v for k, v in table.items() if k in d and isinstance(d[k], type(v))}
    if "head_dim" in table and "head_dim" in d and not d["head_dim"]:  # unset: the model reads it all the same
        small["head_dim"] = table["head_dim"]
    if d.get("head_dim") and d.get("head_dim") == d.get("qk_rope_head_dim") and "qk_rope_head_dim" in small:
        small["head_dim"] = small["qk_rope_head_dim"]  # DeepSeek-V3's head_dim is its rotary part (Kimi-K2.5)
    if "kv_lora_rank" in small and "num_attention_heads" in small and "num_key_value_heads" in d:
        small["num_key_value_heads"] = small["num_attention_heads"]  # MLA expands its keys per query head
    if vocab is not None:
        small["vocab_size"] = vocab
        if softcap is not None and "attn_logit_softcapping" in d:
            small["attn_logit_softcapping"] = softcap
    layers = small.get("num_hidden_layers", small.get("depth"))
    old = d.get("num_hidden_layers", d.get("depth"))
    for k, v in d.items():
        if layers and isinstance(v, list) and old and len(v) == old and k not in small:
            small[k] = _cycle(v, layers)
        elif (
            layers
            and old
            and re.search(r"_(indexes|indices)$", k)
            and isinstance(v, list)
            and v
            and k not in small
            and all(isinstance(i, int) and 0 <= i < old for i in v)
        ):  # layer indices (SAM's global-attention layers): the same places in the shrunk stack
            small[k] = sorted({i * layers // old for i in v})
        elif layers and old and re.fullmatch(r"num_\w+_layers", k) and isinstance(v, int) and 0 < v < old:
            small[k] = max(1, round(v * layers / old))  # a share of the layers (Gemma 3n's KV-sharing ones)
        elif layers and isinstance(v, dict) and v and all(str(i).isdigit() for i in v):  # per-layer settings
            small[k] = {i: x for i, x in v.items() if int(i) < layers}
    hd = small.get("head_dim") or (small.get("hidden_size", 0) // max(1, small.get("num_attention_heads", 1)))
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type
            small[key] = {t: _mrope(cfg, r, hd) for t, r in rope.items()}
        elif isinstance(rope, dict):
            small[key] = _mrope(cfg, rope, hd)
    return type(cfg).from_dict({**d, **small})


def _mrope(cfg, rope: dict, head_dim: int) -> dict:
    """``rope`` with its M-RoPE sections (or those the model's code falls back on) scaled to cover half the
    rotary dimensions of ``head_dim``; unchanged without M-RoPE."""
    sec = rope.get("mrope_section") or _mrope_default(cfg)
    if not sec:
        return rope
    half = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
    new = [max(1, round(x * half / sum(sec))) for x in sec]
    new[0] += half - sum(new)
    return {**rope, "mrope_section": new}


def _timm(cfg) -> tuple[dict, int, int | None] | None:
    """The `TIMM` entry of a timm-backed config (one naming a timm ``architecture``), else None."""
    arch = getattr(cfg, "architecture", None)
    if not isinstance(arch, str) or not hasattr(cfg, "model_args"):
        return None
    if arch not in TIMM:
        raise RuntimeError(f"the coverage matrix has no small version of timm's {arch}")
    return TIMM[arch]


def _shrink_timm(cfg):
    """A timm-backed config with its tower's timm arguments made small (`TIMM`)."""
    d = cfg.to_dict()
    return type(cfg).from_dict({**d, "model_args": {**(d.get("model_args") or {}), **_timm(cfg)[0]}})


def _mrope_default(cfg) -> list[int] | None:
    """The M-RoPE sections a model's code falls back on when its config names none (GLM-4V, PaddleOCR-VL)."""
    module = sys.modules[type(cfg).__module__].__name__.replace(".configuration_", ".modeling_")
    try:
        src = inspect.getsource(importlib.import_module(module))
    except (ImportError, OSError):
        return None
    m = re.search(r"""["']mrope_section["'],\s*(\[[\d, ]+\])""", src)
    return [int(x) for x in m.group(1).strip("[]").split(",")] if m else None


def _token_keys(cfg) -> list[tuple[object, str]]:
    """(config, attribute) of every token id the config holds, top level and text config, and of an image token id
    the class leaves unset (BLIP-2's ``image_token_index``: its checkpoints set it)."""
    out = []
    for owner in (cfg, getattr(cfg, "text_config", None)):
        if owner is None:
            continue
        for k, v in owner.to_dict().items():
            if (re.search(r"_token_(id|index)$", k) and isinstance(v, int) and not isinstance(v, bool)) or (
                k in IMAGE_ID_NAMES and v is None and owner is cfg
            ):
                out.append((owner, k))
    return out


def _unset_image_token(config) -> bool:
    """Whether the config has an image token id field its class leaves unset (None), for the checkpoint to set."""
    return any(k in IMAGE_ID_NAMES and v is None for k, v in config.to_dict().items())


def _processor_tokens(cls) -> tuple[list[str], dict[str, str]]:
    """Special tokens a processor class names (string literals, ``__init__`` defaults, ``*_TOKEN`` class constants
    such as MiniMax-M3's ``"]<]image[>["``) and the tokenizer attributes it reads (``tokenizer.boi_token``), each
    given a token."""
    try:
        src = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError):
        src = ""
    tokens = _LITERAL.findall(src)
    params = inspect.signature(cls.__init__).parameters
    tokens += [p.default for n, p in params.items() if n.endswith("token") and isinstance(p.default, str)]
    tokens += [v for n, v in vars(cls).items() if n.endswith("_TOKEN") and isinstance(v, str) and v]
    module = sys.modules[cls.__module__]
    attrs = {}
    # Each attribute holds the processor's own default or module constant (PaliGemma's IMAGE_TOKEN).
    for a in ("".join(m) for m in _TOKENIZER_ATTR.findall(src)):
        if a in ("bos_token", "eos_token", "pad_token", "unk_token") or a.startswith("add_"):
            continue
        default = params[a].default if a in params else getattr(module, a.upper(), None)
        attrs[a] = default if isinstance(default, str) and default else f"<|{a}|>"
    return list(dict.fromkeys(tokens)), attrs


def _mapped(mapping: dict, model_type: str):
    """``mapping``'s entry for ``model_type``, else that of a type whose processor class is the same."""
    if model_type in mapping:
        return mapping[model_type]
    proc = PROCESSOR_MAPPING_NAMES.get(model_type)
    return next((mapping[t] for t, p in PROCESSOR_MAPPING_NAMES.items() if p == proc and t in mapping), None)


def _image_processor(model_type):
    """The type's default image processor; for a type the image-processor mapping leaves out (GLM-4V MoE,
    Qwen3-VL MoE), the one of a type whose processor class is the same (GLM-4V, Qwen3-VL)."""
    names = _mapped(IMAGE_PROCESSOR_MAPPING_NAMES, model_type)
    if not names:
        raise RuntimeError("no image processor class")
    name = names.get("pil") or names.get("torchvision") if isinstance(names, dict) else names
    return get_image_processor_class_from_name(name)()


def _image_size(image_processor) -> int | None:
    """The square side the image processor resizes (or crops) to, if it has one."""
    for key in (("crop_size" if getattr(image_processor, "do_center_crop", False) else "size"), "size"):
        size = getattr(image_processor, key, None)
        size = size if isinstance(size, dict) else getattr(size, "__dict__", {})
        if size.get("height") and size.get("height") == size.get("width"):
            return int(size["height"])
        if size.get("shortest_edge") and not size.get("longest_edge"):
            return int(size["shortest_edge"])
    return None


def _processor(model_type, proc_cls, tok, config):
    """The type's processor around ``tok``; arguments it leaves unset (patch size, ...) read from ``config``."""
    vision = getattr(config, "vision_config", None)
    kwargs = {"image_processor": _image_processor(model_type), "tokenizer": tok}
    params = inspect.signature(proc_cls.__init__).parameters
    video = _mapped(VIDEO_PROCESSOR_MAPPING_NAMES, model_type)
    if "video_processor" in params and video:
        video = video.get("torchvision") if isinstance(video, dict) else video
        kwargs["video_processor"] = getattr(transformers, video)()
        if getattr(kwargs["video_processor"], "draw_on_frames", False):  # ERNIE 4.5-VL: its font is a hub download
            kwargs["video_processor"].draw_on_frames = False
    audio = _mapped(FEATURE_EXTRACTOR_MAPPING_NAMES, model_type)
    if "feature_extractor" in params and audio:  # audio (Gemma 3n, Gemma 4)
        kwargs["feature_extractor"] = getattr(transformers, audio)()
    if "qformer_tokenizer" in params:  # InstructBLIP's Q-Former reads the prompt too, with a tokenizer of its own
        kwargs["qformer_tokenizer"] = copy.deepcopy(tok)
    ip = kwargs["image_processor"]
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if getattr(ip, "image_seq_length", 0) is None and isinstance(size, int) and isinstance(patch, int):
        ip.image_seq_length = (size // patch) ** 2  # PaliGemma: one token per patch
    timm = _timm(vision) if vision is not None else None
    for name in ("patch_size", "vision_feature_select_strategy", "spatial_merge_size"):
        if name in params and params[name].default is None:
            value = getattr(config, name, None) or getattr(vision, name, None)
            if name == "patch_size" and value is None and timm is not None:
                value = timm[2]
            if value is not None:
                kwargs[name] = value
    if "num_additional_image_tokens" in params:
        kwargs["num_additional_image_tokens"] = int(str(getattr(vision, "model_type", "")).startswith("clip"))
        # A config naming no strategy (VipLlava's) has a model that drops the CLS feature, as "default" says.
        kwargs.setdefault("vision_feature_select_strategy", "default")
    return proc_cls(**kwargs)


def _align(config, processor, vision_first: bool) -> None:
    """Give the vision tower the image size and patch size the processor produces tokens for, as a real
    checkpoint's files agree (the classes' defaults need not: Aya Vision's processor expects 364-px images), and
    the video processor the image processor's sizes."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return
    ip = processor.image_processor
    side = next(
        (
            v
            for v in (getattr(processor, "img_size", None), getattr(processor, "image_size", None))
            if isinstance(v, int)
        ),
        None,
    )
    size = getattr(vision, "image_size", None)
    timm = _timm(vision)
    if timm is not None:
        side = timm[1]
        if isinstance(getattr(ip, "tile_size", None), int):  # PerceptionLM's tiles
            ip.tile_size = side
    if not vision_first:
        side = side or _image_size(ip)
    tokens, patch = getattr(config, "mm_tokens_per_image", None), getattr(vision, "patch_size", None)
    if isinstance(tokens, int) and isinstance(patch, int):  # Gemma 3: one patch per image token (pooling 1 x 1)
        side = side or math.isqrt(tokens) * patch
    side = side or (size[0] if isinstance(size, list | tuple) else size)
    if isinstance(side, int) and _image_size(ip):
        ip.size = {"height": side, "width": side}
        if getattr(ip, "do_center_crop", False):
            ip.crop_size = {"height": side, "width": side}
        if hasattr(vision, "image_size"):
            vision.image_size = [side, side] if isinstance(size, list | tuple) else side
    # The tower's patch: Step 3.7's image processor calls its crop size patch_size and the tower's vision_patch_size.
    patch = getattr(ip, "vision_patch_size", None) or getattr(ip, "patch_size", None)
    patch = patch.get("height") if isinstance(patch, dict) else patch
    down = getattr(config, "downsample_factor", 1) or 1
    tower = getattr(vision, "patch_size", None)
    if (
        not isinstance(patch, int)
        and isinstance(getattr(processor, "patch_size", None), int)
        and isinstance(tower, int)
    ):
        patch = processor.patch_size if processor.patch_size != tower * down else None
    if isinstance(patch, int) and hasattr(vision, "patch_size"):
        vision.patch_size = [patch, patch] if isinstance(vision.patch_size, list | tuple) else patch
    merge = getattr(ip, "merge_size", None) or getattr(processor, "spatial_merge_size", None)
    for owner in (config, vision):
        if isinstance(merge, int) and isinstance(getattr(owner, "spatial_merge_size", None), int):
            owner.spatial_merge_size = merge
    vp = getattr(processor, "video_processor", None)
    for name in ("size", "crop_size", "tile_size", "patch_size", "merge_size"):  # frames sized as the images are
        if vp is not None and getattr(vp, name, None) is not None and getattr(ip, name, None) is not None:
            setattr(vp, name, copy.deepcopy(getattr(ip, name)))


def _named_token(processor, tok, config, names: tuple[str, ...], id_names: tuple[str, ...]) -> str | None:
    """The special token the processor or tokenizer names under one of ``names``, else the one whose id the config
    (or its text config) holds under one of ``id_names`` (GLM-4V names its begin/end-of-image tokens only there)."""
    for n in names:
        value = getattr(processor, n, None) or getattr(tok, n, None)
        if isinstance(value, str):
            return value
    for owner in (config, getattr(config, "text_config", None)):
        for n in id_names:
            value = getattr(owner, n, None)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(tok):
                return tok.convert_ids_to_tokens(value)
    return None


def _placeholder(processor) -> str:
    """The image placeholder a prompt holds, as the generic adapter reads it."""
    return getattr(processor, "image_placeholder_token", None) or processor.image_token


def _chat_template(processor, tok, config) -> str | None:
    """A chat template framing the processor's placeholder by the begin/end-of-image tokens when the processor
    does not write them itself (as the real checkpoints' templates do, e.g. Qwen's and GLM-4V's), and a video's
    placeholder by the begin/end-of-video tokens (else the image's) where the processor takes video; None otherwise
    (the raw prompt, image first)."""
    placeholder = _placeholder(processor)
    boi = _named_token(processor, tok, config, BOI_NAMES, BOI_ID_NAMES)
    eoi = _named_token(processor, tok, config, EOI_NAMES, EOI_ID_NAMES)
    if not (boi and eoi and placeholder not in (boi, eoi)):
        return None  # the raw prompt (image first) serves
    try:
        ids = processor(images=[images(1)[0]], text=[placeholder + " x"], return_tensors="pt")["input_ids"][0]
        framed = tok.convert_tokens_to_ids(boi) in ids.tolist()
    except ValueError:  # the processor insists on the framed form (HunYuan-VL)
        framed = False
    if framed:
        return None
    template = CHAT_TEMPLATE.replace("<image>", f"{boi}{placeholder}{eoi}")
    video = getattr(processor, "video_token", None)
    if isinstance(video, str) and takes_video(processor):  # a video part: its placeholder, framed as the image's
        start = _named_token(processor, tok, config, ("video_start_token",), ()) or boi
        end = _named_token(processor, tok, config, ("video_end_token",), ()) or eoi
        branch = f"{{% elif part['type'] == 'video' %}}{start}{video}{end}\n{{% else %}}"
        template = template.replace("{% else %}", branch, 1)
    return template


def build(model_type: str, path: Path, softcap: float | None = None) -> None:
    """A tiny random checkpoint of ``model_type`` from its own config and processor classes, saved in ``path``.

    The classes' default image sizes need not agree (a real checkpoint's files do): the vision tower's is
    tried first, then the image processor's, and the first whose forward runs is saved."""
    error = None
    for vision_first in (True, False):
        model, processor = _build(model_type, vision_first, softcap)
        try:
            message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
            text = [
                processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
                if processor.chat_template
                else _placeholder(processor) + "hi"
            ]
            types = {"return_mm_token_type_ids": True} if wants_mm_token_types(model.config) else {}
            try:
                inputs = processor(images=[images(1)], text=text, return_tensors="pt", **types)
            except ValueError:  # one image per prompt, not nested (GOT-OCR 2)
                inputs = processor(images=images(1), text=text, return_tensors="pt", **types)
            with torch.no_grad():
                model(
                    **{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
                )
        except Exception as e:  # noqa: BLE001 - the other image size may fit
            error = e
            continue
        model.save_pretrained(path)
        processor.save_pretrained(path)
        return
    raise error


def _merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s values, nested dicts merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(model_type: str, vision_first: bool, softcap: float | None):  # noqa: C901  # one branch per architecture of the coverage matrix
    config = CONFIG_MAPPING[model_type]()
    for table in (CHECKPOINT, WORKAROUND):
        if model_type in table:
            config = type(config).from_dict(_merge(config.to_dict(), table[model_type]))
    proc_cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])
    literals, attrs = _processor_tokens(proc_cls)
    extra = [f"<|{k}|>" for _, k in _token_keys(config)]
    for value in TOKENS.get(model_type, {}).values():
        extra += value if isinstance(value, list) else [value]
    tok = make_tokenizer(list(dict.fromkeys(literals + list(attrs.values()) + extra)), extra_special_tokens=attrs)
    text = getattr(config, "text_config", None)
    sub = {}
    for name, cls in getattr(config, "sub_configs", {}).items():
        value = getattr(config, name, None)
        if value is None and name == "vision_config" and cls is not AutoConfig:
            value = cls()  # Gemma 4's default config leaves the vision tower out; its checkpoints have one
        if value is None or not hasattr(value, "to_dict"):
            continue
        try:
            if _timm(value) is not None:
                sub[name] = _shrink_timm(value)
                continue
            sub[name] = _shrink(value, TEXT if value is text else VISION, len(tok) if value is text else None, softcap)
        except StrictDataclassError:
            if name in ("text_config", "vision_config"):
                raise
            sub[name] = value  # another tower (audio) whose validator ties its widths together: left as it is
    top = {**config.to_dict(), **{k: v.to_dict() for k, v in sub.items()}}
    widths = {}  # a sub-config's width -> its shrunk width, for the top-level fields tied to it
    for name in ("vision_config", "text_config"):
        if name in sub and isinstance(getattr(getattr(config, name), "hidden_size", None), int):
            widths[getattr(config, name).hidden_size] = sub[name].hidden_size
    for k, v in list(top.items()):  # Kimi-K2.5's projection_hidden_size (the vision width), MiniMax-M3's x4 merge
        if re.search(r"(hidden_size|_dim)$", k) and isinstance(v, int) and not isinstance(v, bool):
            old = next((w for w in widths if v % w == 0 and v // w in (1, 2, 4, 9, 16)), None)
            if old is not None:
                top[k] = v // old * widths[old]
    if isinstance(top.get("hidden_size"), int) and "text_config" in sub:  # the text's width (Ovis2's, PaliGemma's)
        top["hidden_size"] = sub["text_config"].hidden_size
    vision = top.get("vision_config") or {}
    depth = vision.get("num_hidden_layers") or vision.get("depth")
    for owner in [top, *(v for v in top.values() if isinstance(v, dict))]:
        for key in ("vision_feature_layer", "vision_feature_layers"):  # layers of the shrunk tower (VipLlava, Molmo 2)
            value = owner.get(key)
            if depth and isinstance(value, list) and all(isinstance(v, int) for v in value):
                owner[key] = [max(-depth, min(v, depth - 1)) for v in value]
    small = type(config).from_dict(top)
    if text is None:
        small = _shrink(small, TEXT, len(tok), softcap)
    if isinstance(getattr(small, "projection_dim", None), int):  # PaliGemma: image features in the text's width
        small.projection_dim = getattr(small.get_text_config(), "hidden_size", 64)
        if isinstance(getattr(small.vision_config, "projection_dim", None), int):
            small.vision_config.projection_dim = small.projection_dim
    processor = _processor(model_type, proc_cls, tok, small)
    _align(small, processor, vision_first)
    for owner, key in _token_keys(small):
        setattr(owner, key, _token_id(processor, tok, key))
    for key, value in TOKENS.get(model_type, {}).items():
        ids = tok.convert_tokens_to_ids(value)
        setattr(small, key, ids)
    processor.chat_template = _chat_template(processor, tok, small)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(small, dtype=torch.float32).float().eval()
    # Weights a trained model has but initialisation leaves (almost) zero: Gemma 3's image projection, the SAM
    # towers' (GOT-OCR 2's initializer_range is 1e-10), which would make every image look alike.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and p.abs().max() < 1e-6:
                p.normal_(0.0, 0.02)
    return model, processor


def _token_id(processor, tok, key: str) -> int:
    """The tokenizer id a config's ``*_token_id`` / ``*_token_index`` should hold."""
    base = re.sub(r"_(id|index)$", "", key)
    if base == "image_token" and isinstance(getattr(processor, "img_patch_token", None), str):
        return tok.convert_tokens_to_ids(processor.img_patch_token)  # Llama 4: <|image|> marks, <|patch|> carries
    for owner in (tok, processor):  # the tokenizer's first: Gemma 3's processor calls its boi token image_token
        value = getattr(owner, f"{base}_id", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        token = getattr(owner, base, None)
        if isinstance(token, str) and token:
            return tok.convert_tokens_to_ids(token)
    return tok.convert_tokens_to_ids(f"<|{key}|>")


# --- checks --------------------------------------------------------------------------------------
def _close(a, b, what):
    diff = (a.float() - b.float()).abs().max().item()
    if diff > ATOL:
        raise AssertionError(f"{what} differ by {diff:.1e}")


def check_roles(vlm, batch):
    image_ids = torch.tensor(sorted(vlm.family.content_ids))
    for b in range(batch.size):
        lay = batch.layouts[b]
        placeholders = torch.nonzero(torch.isin(batch.input_ids[b], image_ids)).flatten().tolist()
        if not placeholders or lay.start > placeholders[0] or lay.end < placeholders[-1]:
            raise AssertionError("the image span does not cover the image placeholder tokens")
    for role in ("image", "image_content", "eoi", "text", "last"):
        batch.mask(role)


def check_blind(vlm, batch):
    eoi = int(batch.index("eoi")[0])
    base = vlm.forward(batch).logits[:, eoi:]
    if (base[0] - base[1]).abs().max() <= 1e-4:
        raise AssertionError("the two images give the same text logits without a knockout")
    blind = vlm.forward(batch, knockouts=[ng.Knockout("image", ("eoi", "text"), mode="mask")]).logits[:, eoi:]
    _close(blind[0], blind[1], "text logits of two images under the image knockout")


def check_reference(vlm, batch, path):
    ref = reference.reference_model(path, vlm.family.decoder_layers)
    plain = vlm.forward(batch).logits
    keep = batch.inputs["attention_mask"].bool()
    for mode in ("mask", "zero"):
        ours = vlm.forward(batch, knockouts=[ng.Knockout("eoi", "text", mode=mode)]).logits
        reference.EDITS.update(mask=[], zero=[])
        reference.EDITS[mode] = [(None, batch.mask("text"), batch.mask("eoi"))]
        try:
            with torch.no_grad():
                theirs = ref(**vlm.model_inputs(batch), use_cache=False).logits
        finally:
            reference.EDITS.update(mask=[], zero=[])
        if (plain - theirs)[keep].abs().max() <= 1e-4:
            raise AssertionError(f"the {mode}-mode eoi knockout does not change the reference's logits")
        _close(ours[keep], theirs[keep], f"{mode}-mode eoi->text logits and the eager reference's")


def check_capture(vlm, batch):
    res = vlm.forward(batch, capture=ng.Capture("last")).residuals["last"]
    with torch.no_grad():
        out = vlm.model(**vlm.model_inputs(batch), output_hidden_states=True, use_cache=False)
    hs = getattr(out, "hidden_states", None) or out.language_model_outputs.hidden_states  # BLIP-2 nests its LM's
    if len(hs) != vlm.n_layers + 1:
        raise AssertionError(f"the model returns {len(hs)} hidden states for {vlm.n_layers} layers")
    for l in range(vlm.n_layers):
        _close(res[:, l], hs[l][:, -1], f"captured residual {l} and hidden state {l}")


def check_prefix(vlm, batch):
    from narrowgate.engine.shared import Condition

    other = vlm.forward(batch, capture=ng.Capture("eoi")).residuals["eoi"].flip(0)
    conds = [
        Condition("baseline"),
        Condition("eoi->text", knockouts=(ng.Knockout("eoi", "text"),)),
        Condition("image->text", knockouts=(ng.Knockout("image", "text", mode="mask"),)),
        Condition("patch", patches=(ng.Patch("eoi", 1, other[:, 1]),)),
    ]
    shared = vlm.forward_conditions(batch, conds)
    for c in conds:
        full = vlm.forward(batch, knockouts=c.knockouts, patches=c.patches).logits[:, -1]
        _close(shared[c.name].last_logits, full, f"shared-prefix and separate logits ({c.name})")


class NotApplicable(Exception):
    """The architecture cannot take what a column asks for (a video, for a model without a video processor)."""


class Refused(Exception):
    """narrowgate refuses what a column asks for, with the one line it gives a user."""


def _refusal(prepare) -> None:
    """Run ``prepare``; narrowgate's refusal (a layout or narrowgate error: one line to the user) as `Refused`."""
    try:
        prepare()
    except (LayoutError, NarrowgateError) as e:
        raise Refused(str(e)) from None


def check_multi_image(vlm, path) -> None:
    """Two images in one prompt: each image's roles hold its own features, per-image knockouts and a patch equal
    the independent references, shared-prefix conditions equal separate forwards, ``image@1`` knocked out leaves the
    text blind to image 1 (tests/families/several_checks.py). `Refused` where the family takes one image only."""
    _refusal(lambda: vlm.prepare(several.two_images(), several.PROMPTS))
    several.check_image_roles(vlm)
    several.check_image_interventions(vlm, path)
    several.check_image_blind(vlm)


def takes_video(processor) -> bool:
    """Whether the architecture takes video: its processor class has a video processor."""
    return "video_processor" in inspect.signature(type(processor).__init__).parameters


def check_video(vlm, path) -> None:
    """A short clip: ``frame@t`` are the model's frames, per-frame knockouts equal the eager reference and the
    scan's batched knockouts separate forwards, ``frame@1`` knocked out leaves the text blind to the first frame
    (tests/families/several_checks.py). `NotApplicable` where the processor takes no video; `Refused` where
    narrowgate does not read the model's video (its refusal)."""
    if not takes_video(vlm.family.processor):
        raise NotApplicable(f"{type(vlm.family.processor).__name__} takes no video")
    _refusal(lambda: vlm.prepare([several.clip()], [several.CLIP_PROMPT]))
    several.check_frames(vlm)
    several.check_video_interventions(vlm, path)
    several.check_video_blind(vlm)


def _column(check, vlm, path) -> str:
    """A column's cell: "yes" when ``check`` passes, else why not (never raises)."""
    try:
        check(vlm, path)
    except NotApplicable as e:
        return f"n/a — the architecture takes no video ({e})"
    except Refused as e:
        return f"refused: {e}"
    except Exception as e:  # noqa: BLE001 - one column's failure is recorded, never fatal
        msg = " ".join(str(e).split())[:160] or type(e).__name__
        return f"fails: {type(e).__name__}: {msg}"
    return "yes"


def _check(path: str, passed: list[str], state: dict, label: str = ""):
    """Load ``path`` and run every check in order, appending each one passed; ``state["step"]`` names the step
    under way (for the reason when one raises), ``state["vlm"]`` the model loaded (unlabelled runs only).
    Soft-capped models run eager (transformers' SDPA refuses them)."""
    state["step"] = f"{label}load"
    capped = getattr(AutoConfig.from_pretrained(path).get_text_config(), "attn_logit_softcapping", None) is not None
    vlm = ng.load(path, dtype="float32", attn_implementation="eager" if capped else "sdpa")
    if not label:  # the columns run on the checkpoint as built, not on its soft-capped copy
        state["vlm"] = vlm
    state["how"] = "generic" if type(vlm.family) is Generic else "dedicated"
    state["step"] = f"{label}prepare"
    same = vlm.prepare(images(2, seed=2), [PROMPTS[1]] * 2)
    for name in CHECKS:
        state["step"] = f"{label}{name}"
        if name == "roles":
            check_roles(vlm, same)
        elif name == "blind":
            check_blind(vlm, same)
        elif name == "reference":
            check_reference(vlm, vlm.prepare(images(2, seed=1), PROMPTS), path)
        elif name == "capture":
            check_capture(vlm, same)
        else:
            check_prefix(vlm, same)
        passed.append(name)


def run_type(model_type: str) -> tuple[str, list[str], str, dict[str, str]]:
    """(roles, checks passed, why not, column cells) for one model type, in a child process limited to MEMORY bytes
    of address space, SECONDS_PER_TYPE seconds for the checks and SECONDS_COLUMNS more for the columns, so that a
    type that crashes, runs away or will not shrink costs only itself (and a column that runs away, only itself)."""
    parent, child = multiprocessing.get_context("fork").Pipe(duplex=False)
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(model_type, child), daemon=True)
    proc.start()
    child.close()
    cells = dict.fromkeys(COLUMNS, UNREACHED)

    def receive(seconds: float):
        try:
            return parent.recv() if parent.poll(max(0.0, seconds)) else None
        except EOFError:  # the child died before sending
            return None

    result = receive(SECONDS_PER_TYPE)
    if result is not None:
        deadline = time.monotonic() + SECONDS_COLUMNS
        for name in COLUMNS:
            cell = receive(deadline - time.monotonic())
            if cell is None:
                late = proc.is_alive() or proc.exitcode == -9
                cells[name] = f"fails: took more than {SECONDS_COLUMNS} s" if late else UNREACHED
                break
            cells[name] = cell
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        why = (
            f"took more than {SECONDS_PER_TYPE} s"
            if proc.exitcode in (None, -9)
            else f"the check process died (exit code {proc.exitcode})"
        )
        return "—", [], why, cells
    return (*result, cells)


def _child(model_type: str, conn) -> None:
    # MEMORY more than the forked parent already maps (a test process may map many GiB before calling this).
    limit = _address_space() + MEMORY
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # A parent that already ran torch's OpenMP pool leaves a forked child that hangs in its first parallel region
    # (libgomp is not fork-safe): the checks run single-threaded.
    torch.set_num_threads(1)
    _run_type(model_type, conn.send)
    conn.close()


def _address_space() -> int:
    """Bytes of virtual address space this process maps now (VmSize)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _run_type(model_type: str, send) -> None:
    """Send (roles, checks passed, why not) for one model type, then each column's cell in `COLUMNS` order (on the
    checkpoint the checks loaded; `UNREACHED` where none loaded); never raises.

    Where the text config has ``attn_logit_softcapping`` switched off, every check runs a second time on a copy
    with it on, and ``softcap`` is one more check passed."""
    passed: list[str] = []
    state = {"how": "—", "step": "build"}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        send(_checks(model_type, tmp, passed, state))
        vlm = state.get("vlm")
        for check in (check_multi_image, check_video):
            send(_column(check, vlm, tmp) if vlm is not None else UNREACHED)


def _checks(model_type: str, tmp: str, passed: list[str], state: dict) -> tuple[str, list[str], str]:
    """(roles, checks passed, why not) for one model type, its checkpoint built in ``tmp``; never raises."""
    try:
        config = CONFIG_MAPPING[model_type]()
        if out_of_scope(config) is not None:
            return "out of scope", passed, out_of_scope(config)
        try:
            state["how"] = "generic" if detect(config) is Generic else "dedicated"
        except UnsupportedModelError:
            if not _unset_image_token(config):  # else the built config has it: the load detects again
                return state["how"], passed, f"no adapter: {refusal(config)}"
        if PROCESSOR_MAPPING_NAMES.get(model_type) is None:
            return state["how"], passed, "transformers maps no processor class to it"
        fixture = ROOT / "tests" / "fixtures" / f"{model_type}.py"
        if fixture.exists():  # the tests' own tiny checkpoint (dedicated adapters' families)
            importlib.import_module(f"tests.fixtures.{model_type}").build(Path(tmp))
        else:
            build(model_type, Path(tmp))
        _check(tmp, passed, state)
        if fixture.exists() or getattr(config.get_text_config(), "attn_logit_softcapping", 0) is not None:
            return state["how"], passed, ""  # no soft-capping in the architecture, or on already
        with tempfile.TemporaryDirectory() as capped:
            state["step"] = "softcap build"
            build(model_type, Path(capped), softcap=SOFTCAP)
            _check(capped, [], state, label="softcap ")
            passed.append("softcap")
        return state["how"], passed, ""
    except Exception as e:  # noqa: BLE001 - one type's failure is recorded, never fatal
        msg = " ".join(str(e).split())[:160] or type(e).__name__
        return state["how"], passed, f"{state['step']}: {type(e).__name__}: {msg}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", help="comma-separated model types (default: every type in the mapping)")
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the table as Markdown (docs/_generated/coverage.md: redirect stdout there)",
    )
    args = parser.parse_args(argv)
    every = list(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    types = every if not args.types else [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES]
    if unknown:
        parser.error(f"not in transformers' image-text-to-text mapping: {', '.join(unknown)}")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows = []
    for t in types:
        start = time.time()
        how, passed, why, cells = run_type(t)
        if why and t in KNOWN:
            why = f"{KNOWN[t]} ({why})"
        rows.append((t, how, passed, why, cells))
        if not args.markdown:
            columns = "  ".join(f"{c}: {cells[c]}" for c in COLUMNS)
            print(
                f"{t:28s} {how:12s} {','.join(passed) or '-':38s} {why}  {columns}  [{time.time() - start:.0f}s]",
                flush=True,
            )
    if args.markdown:
        print(f"| model type | roles | checks passed | {' | '.join(COLUMNS)} | why not |")
        print(f"|---|---|---|{'---|' * len(COLUMNS)}---|")
        for t, how, passed, why, cells in rows:
            if why:
                checks = ", ".join(passed) or "none"
            else:
                checks = "all + softcap" if "softcap" in passed else "all"
            columns = " | ".join(cells[c].replace("|", "/") for c in COLUMNS)
            print(f"| {t} | {how} | {checks} | {columns} | {why.replace('|', '/')} |")
    for c in COLUMNS:
        print(f"{c}: {_tally([cells[c] for *_, cells in rows])}")
    n = sum(len(p) >= len(CHECKS) and not why for _, _, p, why, _ in rows)
    print(f"coverage: {n} of {len(rows)} model types pass every check")
    return 0


def _tally(cells: list[str]) -> str:
    """A column's summary: how many types pass it, and how many of the others it does not apply to, refuse it,
    fail it or never reached it."""
    counts = {
        what: sum(c.startswith(prefix) for c in cells)
        for what, prefix in (
            ("n/a", "n/a"),
            ("refused", "refused"),
            ("fail", "fails"),
            ("not reached", UNREACHED),
        )
    }
    rest = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    return f"{sum(c == 'yes' for c in cells)} of {len(cells)} model types pass" + (f" ({rest})" if rest else "")


if __name__ == "__main__":
    sys.exit(main())
