"""Coverage matrix: every model type transformers maps to AutoModelForImageTextToText, built tiny and checked.

For each type: a tiny random checkpoint from the type's own config class (default config, widths and depths
shrunk, sliding windows and attention chunks shortened so they bind on short prompts) and its own processor
class (default image processor, a locally trained tokenizer holding every special token the processor names),
saved and loaded back with `narrowgate.load` (a type with a tiny checkpoint in tests/fixtures/ uses that one).
Then the checks:

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

Each type runs in its own process (6 GiB of address space, 150 s); a failure costs only its type: the reason is
recorded and the run goes on. Usage:
``python scripts/coverage.py [--types a,b,c] [--markdown]``; the last line reads
``coverage: N of M model types pass every check``.
"""

from __future__ import annotations

import argparse
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

import torch
import transformers
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
from narrowgate.families import (
    Generic,
    UnsupportedModelError,
    detect,
    out_of_scope,
    refusal,
)
from narrowgate.families.generic import BOI_NAMES, EOI_NAMES, wants_mm_token_types
from tests.engine import reference
from tests.fixtures.common import CHAT_TEMPLATE, PROMPTS, images, make_tokenizer

CHECKS = ("roles", "blind", "reference", "capture", "prefix")
ATOL = 1e-5
SECONDS_PER_TYPE = 150
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
    "sliding_window": 8,
    "attention_chunk_size": 8,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "hidden_size_per_layer_input": 16,
}
VISION = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "depth": 2,
    "num_attention_heads": 2,
    "num_heads": 2,
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
#: What a type's failure means, where it is known.
KNOWN = {
    "llama4": "transformers bug: Llama4ForConditionalGeneration.forward reads `image_outputs` from the language "
    "model's output, so no forward with an image runs (chunked attention therefore unchecked)",
}
#: Special-token-like string literals in a processor's source.
_LITERAL = re.compile(r"""["'](<\|?[A-Za-z_][\w:. -]{0,40}\|?>|\[[A-Z][A-Z_]{1,30}\])["']""")
_TOKENIZER_ATTR = re.compile(r"tokenizer\.(\w+_token)\b")


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
    if vocab is not None:
        small["vocab_size"] = vocab
        if softcap is not None and "attn_logit_softcapping" in d:
            small["attn_logit_softcapping"] = softcap
    layers = small.get("num_hidden_layers", small.get("depth"))
    old = d.get("num_hidden_layers", d.get("depth"))
    for k, v in d.items():
        if layers and isinstance(v, list) and old and len(v) == old and k not in small:
            small[k] = _cycle(v, layers)
        elif layers and isinstance(v, dict) and v and all(str(i).isdigit() for i in v):  # per-layer settings
            small[k] = {i: x for i, x in v.items() if int(i) < layers}
    hd = small.get("head_dim") or (small.get("hidden_size", 0) // max(1, small.get("num_attention_heads", 1)))
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        sec = rope.get("mrope_section") or _mrope_default(cfg) if isinstance(rope, dict) else None
        if sec:  # M-RoPE sections cover half the rotary dimensions
            half = int(hd * rope.get("partial_rotary_factor", 1.0)) // 2
            new = [max(1, round(x * half / sum(sec))) for x in sec]
            new[0] += half - sum(new)
            small[key] = {**rope, "mrope_section": new}
    return type(cfg).from_dict({**d, **small})


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
    """(config, attribute) of every token id the config holds, top level and text config."""
    out = []
    for owner in (cfg, getattr(cfg, "text_config", None)):
        if owner is None:
            continue
        for k, v in owner.to_dict().items():
            if re.search(r"_token_(id|index)$", k) and isinstance(v, int) and not isinstance(v, bool):
                out.append((owner, k))
    return out


def _processor_tokens(cls) -> tuple[list[str], dict[str, str]]:
    """Special tokens a processor class names (string literals, ``__init__`` defaults) and the tokenizer
    attributes it reads (``tokenizer.boi_token``), each given a token."""
    try:
        src = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError):
        src = ""
    tokens = _LITERAL.findall(src)
    params = inspect.signature(cls.__init__).parameters
    tokens += [p.default for n, p in params.items() if n.endswith("token") and isinstance(p.default, str)]
    module = sys.modules[cls.__module__]
    attrs = {}
    for a in _TOKENIZER_ATTR.findall(src):  # the processor's own default or module constant (PaliGemma's IMAGE_TOKEN)
        if a in ("bos_token", "eos_token", "pad_token", "unk_token") or a.startswith("add_"):
            continue
        default = params[a].default if a in params else getattr(module, a.upper(), None)
        attrs[a] = default if isinstance(default, str) and default else f"<|{a}|>"
    return list(dict.fromkeys(tokens)), attrs


def _image_processor(model_type):
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
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
    if "video_processor" in params and model_type in VIDEO_PROCESSOR_MAPPING_NAMES:
        video = VIDEO_PROCESSOR_MAPPING_NAMES[model_type]
        video = video.get("torchvision") if isinstance(video, dict) else video
        kwargs["video_processor"] = getattr(transformers, video)()
    if "feature_extractor" in params and model_type in FEATURE_EXTRACTOR_MAPPING_NAMES:  # audio (Gemma 3n, Gemma 4)
        kwargs["feature_extractor"] = getattr(transformers, FEATURE_EXTRACTOR_MAPPING_NAMES[model_type])()
    ip = kwargs["image_processor"]
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if getattr(ip, "image_seq_length", 0) is None and isinstance(size, int) and isinstance(patch, int):
        ip.image_seq_length = (size // patch) ** 2  # PaliGemma: one token per patch
    for name in ("patch_size", "vision_feature_select_strategy", "spatial_merge_size"):
        if name in params and params[name].default is None:
            value = getattr(config, name, None) or getattr(vision, name, None)
            if value is not None:
                kwargs[name] = value
    if "num_additional_image_tokens" in params:
        kwargs["num_additional_image_tokens"] = int(str(getattr(vision, "model_type", "")).startswith("clip"))
    return proc_cls(**kwargs)


def _align(config, processor, vision_first: bool) -> None:
    """Give the vision tower the image size and patch size the processor produces tokens for, as a real
    checkpoint's files agree (the classes' defaults need not: Aya Vision's processor expects 364-px images)."""
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
    patch = getattr(ip, "patch_size", None)
    patch = patch.get("height") if isinstance(patch, dict) else patch
    down = getattr(config, "downsample_factor", 1) or 1
    if not isinstance(patch, int) and isinstance(getattr(processor, "patch_size", None), int):
        patch = processor.patch_size if processor.patch_size != getattr(vision, "patch_size", None) * down else None
    if isinstance(patch, int) and hasattr(vision, "patch_size"):
        vision.patch_size = [patch, patch] if isinstance(vision.patch_size, list | tuple) else patch
    merge = getattr(ip, "merge_size", None) or getattr(processor, "spatial_merge_size", None)
    for owner in (config, vision):
        if isinstance(merge, int) and isinstance(getattr(owner, "spatial_merge_size", None), int):
            owner.spatial_merge_size = merge


def _chat_template(processor, tok) -> str | None:
    """A chat template framing the processor's placeholder by the begin/end-of-image tokens when the processor
    does not write them itself (as the real checkpoints' templates do, e.g. Qwen's); None otherwise (the raw
    prompt, image first)."""
    placeholder = processor.image_token
    boi = next(
        (
            getattr(processor, n, None) or getattr(tok, n, None)
            for n in BOI_NAMES
            if isinstance(getattr(processor, n, None) or getattr(tok, n, None), str)
        ),
        None,
    )
    eoi = next(
        (
            getattr(processor, n, None) or getattr(tok, n, None)
            for n in EOI_NAMES
            if isinstance(getattr(processor, n, None) or getattr(tok, n, None), str)
        ),
        None,
    )
    if not (boi and eoi and placeholder not in (boi, eoi)):
        return None  # the raw prompt (image first) serves
    try:
        ids = processor(images=[images(1)[0]], text=[placeholder + " x"], return_tensors="pt")["input_ids"][0]
        framed = tok.convert_tokens_to_ids(boi) in ids.tolist()
    except ValueError:  # the processor insists on the framed form (HunYuan-VL)
        framed = False
    if framed:
        return None
    return CHAT_TEMPLATE.replace("<image>", f"{boi}{placeholder}{eoi}")


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
                else processor.image_token + "hi"
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


def _build(model_type: str, vision_first: bool, softcap: float | None):
    config = CONFIG_MAPPING[model_type]()
    proc_cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])
    literals, attrs = _processor_tokens(proc_cls)
    extra = [f"<|{k}|>" for _, k in _token_keys(config)]
    tok = make_tokenizer(list(dict.fromkeys(literals + list(attrs.values()) + extra)), extra_special_tokens=attrs)
    text = getattr(config, "text_config", None)
    sub = {}
    for name in getattr(config, "sub_configs", {}):
        value = getattr(config, name, None)
        if value is not None and hasattr(value, "to_dict"):
            sub[name] = _shrink(value, TEXT if value is text else VISION, len(tok) if value is text else None, softcap)
    small = type(config).from_dict({**config.to_dict(), **{k: v.to_dict() for k, v in sub.items()}})
    if text is None:
        small = _shrink(small, TEXT, len(tok), softcap)
    if isinstance(getattr(small, "projection_dim", None), int):  # PaliGemma: image features in the text's width
        small.projection_dim = getattr(small.get_text_config(), "hidden_size", 64)
        if isinstance(getattr(small.vision_config, "projection_dim", None), int):
            small.vision_config.projection_dim = small.projection_dim
    vision = getattr(small, "vision_config", None)
    depth = getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", None)
    for key in ("vision_feature_layer", "vision_feature_layers"):  # layers of the shrunk tower (VipLlava)
        value = getattr(small, key, None)
        if depth and isinstance(value, list):
            setattr(small, key, [max(-depth, min(v, depth - 1)) for v in value])
    processor = _processor(model_type, proc_cls, tok, small)
    _align(small, processor, vision_first)
    for owner, key in _token_keys(small):
        setattr(owner, key, _token_id(processor, tok, key))
    processor.chat_template = _chat_template(processor, tok)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(small, dtype=torch.float32).float().eval()
    with torch.no_grad():  # weights a trained model has but initialisation zeroes (Gemma 3's image projection)
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
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
        hs = vlm.model(**vlm.model_inputs(batch), output_hidden_states=True, use_cache=False).hidden_states
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


def _check(path: str, passed: list[str], state: dict, label: str = "") -> None:
    """Load ``path`` and run every check in order, appending each one passed; ``state["step"]`` names the step
    under way (for the reason when one raises). Soft-capped models run eager (transformers' SDPA refuses them)."""
    state["step"] = f"{label}load"
    capped = getattr(AutoConfig.from_pretrained(path).get_text_config(), "attn_logit_softcapping", None) is not None
    vlm = ng.load(path, dtype="float32", attn_implementation="eager" if capped else "sdpa")
    state["how"] = "generic" if isinstance(vlm.family, Generic) else "dedicated"
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


def run_type(model_type: str) -> tuple[str, list[str], str]:
    """(roles, checks passed, why not) for one model type, in a child process limited to MEMORY bytes of address
    space and SECONDS_PER_TYPE seconds, so that a type that crashes, runs away or will not shrink costs only itself."""
    parent, child = multiprocessing.get_context("fork").Pipe(duplex=False)
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(model_type, child), daemon=True)
    proc.start()
    child.close()
    try:
        result = parent.recv() if parent.poll(SECONDS_PER_TYPE) else None
    except EOFError:  # the child died before sending
        result = None
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
        return "—", [], why
    return result


def _child(model_type: str, conn) -> None:
    # MEMORY more than the forked parent already maps (a test process may map many GiB before calling this).
    limit = _address_space() + MEMORY
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # A parent that already ran torch's OpenMP pool leaves a forked child that hangs in its first parallel region
    # (libgomp is not fork-safe): the checks run single-threaded.
    torch.set_num_threads(1)
    conn.send(_run_type(model_type))
    conn.close()


def _address_space() -> int:
    """Bytes of virtual address space this process maps now (VmSize)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _run_type(model_type: str) -> tuple[str, list[str], str]:
    """(roles, checks passed, why not) for one model type; never raises.

    Where the text config has ``attn_logit_softcapping`` switched off, every check runs a second time on a copy
    with it on, and ``softcap`` is one more check passed."""
    passed: list[str] = []
    state = {"how": "—", "step": "build"}
    try:
        config = CONFIG_MAPPING[model_type]()
        if out_of_scope(config) is not None:
            return "out of scope", passed, out_of_scope(config)
        try:
            state["how"] = "generic" if detect(config) is Generic else "dedicated"
        except UnsupportedModelError:
            return state["how"], passed, f"no adapter: {refusal(config)}"
        if PROCESSOR_MAPPING_NAMES.get(model_type) is None:
            return state["how"], passed, "transformers maps no processor class to it"
        fixture = ROOT / "tests" / "fixtures" / f"{model_type}.py"
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fixture.exists():  # the tests' own tiny checkpoint (dedicated adapters' families)
                importlib.import_module(f"tests.fixtures.{model_type}").build(Path(tmp))
            else:
                build(model_type, Path(tmp))
            _check(tmp, passed, state)
        if fixture.exists() or getattr(config.get_text_config(), "attn_logit_softcapping", 0) is not None:
            return state["how"], passed, ""  # no soft-capping in the architecture, or on already
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state["step"] = "softcap build"
            build(model_type, Path(tmp), softcap=SOFTCAP)
            _check(tmp, [], state, label="softcap ")
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
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows = []
    for t in types:
        start = time.time()
        how, passed, why = run_type(t)
        if why and t in KNOWN:
            why = f"{KNOWN[t]} ({why})"
        rows.append((t, how, passed, why))
        if not args.markdown:
            print(f"{t:28s} {how:12s} {','.join(passed) or '-':38s} {why}  [{time.time() - start:.0f}s]", flush=True)
    if args.markdown:
        print("| model type | roles | checks passed | why not |")
        print("|---|---|---|---|")
        for t, how, passed, why in rows:
            if why:
                checks = ", ".join(passed) or "none"
            else:
                checks = "all + softcap" if "softcap" in passed else "all"
            print(f"| {t} | {how} | {checks} | {why.replace('|', '/')} |")
    n = sum(len(p) >= len(CHECKS) and not why for _, _, p, why in rows)
    print(f"coverage: {n} of {len(rows)} model types pass every check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
