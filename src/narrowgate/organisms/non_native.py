"""The non-native organism: a stock LLaVA-1.5, a text-aligned vision encoder bolted onto a text LM.

Recipe (the paper's text-output models, Sec. 3.1 and 5): (1) the CLIP vision tower is trained
contrastively against a small text encoder on the captions (`clip`), so it is aligned with text;
(2) the Llama decoder is pre-trained on text only: descriptions of scenes and text-only chats
(a caption in place of the image, then the experiments' prompts and the answer); (3) with the
vision tower frozen, as in LLaVA, the projector alone is trained on captioning (``align``), then
projector and decoder on the task mixture (``instruct``), with the loss on the answer tokens only
(never on image tokens). Image features are those LLaVA-1.5 uses: the second-to-last layer of the
tower, patch tokens only.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch
from transformers import (
    CLIPImageProcessorPil,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from ..compat import BaseModelOutputWithPooling
from ..data.base import DEFAULT_SEED
from ..data.prompts import CAPTION
from ..data.synthetic import scene_captions, synthetic_captions
from . import clip as cliplib
from .common import (
    EOS,
    Example,
    Phase,
    Recipe,
    batches,
    decoder_config,
    description,
    pad_rows,
    render,
    run_phase,
    seed_all,
    task_example,
    train_tokenizer,
    training_scenes,
)
from .tiny import tiny_llava

RESOLUTION = 64
PATCH = 8
IMAGE_SEQ_LENGTH = (RESOLUTION // PATCH) ** 2
#: LLaVA-1.5's conversation format: ``USER: <image>\n{prompt} ASSISTANT:``.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


RECIPE = [
    "Contrastive (CLIP) pre-training of the ViT vision tower against a small text transformer on (image, caption) "
    "pairs: the image encoder is aligned with text.",
    "Text-only pre-training of the Llama decoder from scratch: scene descriptions and text-only chats (a caption "
    "where the image would be, the experiments' prompts, the answer); loss on every text token.",
    "LLaVA stage 1 (align): vision tower and decoder frozen, the projector alone learns captioning; loss on the "
    "answer tokens only.",
    "LLaVA stage 2 (instruct): projector + decoder on the VQA / caption / class mixture, vision tower frozen; loss "
    "on the answer tokens only (never on image tokens).",
]


@dataclass(frozen=True)
class NonNativeConfig(Recipe):
    """Sizes and schedule; the defaults are the shipped recipe."""

    vision_hidden: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    clip_steps: int = 2000
    clip_batch_size: int = 64
    text_steps: int = 400
    align_steps: int = 150


TINY = NonNativeConfig(
    n_images=48,
    vision_hidden=32,
    vision_layers=2,
    vision_heads=2,
    clip_steps=4,
    clip_batch_size=16,
    hidden=32,
    layers=1,
    heads=2,
    text_steps=8,
    align_steps=4,
    steps=12,
    batch_size=8,
    lr=3e-3,
)


def build(config: NonNativeConfig) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised LLaVA with its processor (tokenizer trained on the organisms' corpus)."""
    tok = train_tokenizer(["<image>"])
    vision = cliplib.vision_config(config.vision_hidden, config.vision_layers, config.vision_heads, RESOLUTION, PATCH)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION}
    )
    return tiny_llava(
        tok,
        vision,
        decoder_config(config, tok),
        image_processor,
        patch=PATCH,
        feature_layer=-2,
        chat_template=CHAT_TEMPLATE,
    )


def chat(processor: LlavaProcessor, parts: list[dict]) -> str:
    """The user turn ``parts`` in the chat template, ending with the generation prompt."""
    # transformers types a message's content as a string only, not a list of parts
    messages = [{"role": "user", "content": parts}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[arg-type]


class Rows:
    """Token rows for the text-only and multimodal phases, in the chat format the experiments use."""

    def __init__(self, processor: LlavaProcessor, scenes, seed: int):
        self.processor = processor
        self.tok = processor.tokenizer
        self.scenes = scenes
        self.rng = random.Random(f"non-native-rows:{seed}")
        self.eos = self.tok.convert_tokens_to_ids(EOS)
        self.image = processor.image_token * IMAGE_SEQ_LENGTH
        self._cache: dict[tuple[str, bool], list[int]] = {}

    def ids(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of ``text`` (BOS first when ``bos``), cached: the same prompts recur on every row."""
        if (text, bos) not in self._cache:
            self._cache[text, bos] = self.tok(text, add_special_tokens=bos)["input_ids"]
        return self._cache[text, bos]

    def text_only(self, i: int) -> list[int]:
        """A scene description, or a chat with a caption where the image would be; loss on every token."""
        scene = self.scenes[i]
        if self.rng.random() < 0.5:
            return self.ids(description(scene, self.rng), bos=True) + [self.eos]
        ex = task_example(scene, self.rng)
        caption = self.rng.choice(scene_captions(scene)).capitalize() + ".\n"
        prompt = chat(self.processor, [{"type": "text", "text": caption}, {"type": "text", "text": ex.prompt}])
        return self.ids(prompt, bos=True) + self.ids(ex.target) + [self.eos]

    def multimodal(self, i: int, captions_only: bool = False) -> tuple[list[int], list[int]]:
        """A random task (or a caption) for image ``i`` as `pair` rows."""
        scene = self.scenes[i]
        if captions_only:
            return self.pair(Example("caption", CAPTION, " " + self.rng.choice(scene_captions(scene))))
        return self.pair(task_example(scene, self.rng))

    def pair(self, ex: Example) -> tuple[list[int], list[int]]:
        """``(ids, labels)``: image-first chat prompt (labels -100) then answer and ``</s>``."""
        prompt = chat(self.processor, [{"type": "image"}, {"type": "text", "text": ex.prompt}])
        head = self.ids(prompt.replace(self.processor.image_token, self.image), bos=True)
        answer = self.ids(ex.target) + [self.eos]
        return head + answer, [-100] * len(head) + answer


@torch.no_grad()
def image_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The frozen tower's features as LLaVA selects them (layer ``vision_feature_layer``, no CLS)."""
    cfg = model.config
    out = []
    for i in range(0, len(pixels), batch_size):
        hs = model.model.vision_tower(pixels[i : i + batch_size], output_hidden_states=True).hidden_states
        out.append(hs[cfg.vision_feature_layer][:, 1:])
    return torch.cat(out)


def multimodal_loss(model: LlavaForConditionalGeneration, ids, mask, labels, features) -> torch.Tensor:
    """The stock forward's loss, with the (frozen) tower's features precomputed and projected here."""
    projected = model.model.multi_modal_projector(features)
    # transformers types pooler_output as a Tensor; LLaVA's mm_encoder_outputs takes a list of per-image features
    cached = {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}  # type: ignore[arg-type]
    return model(input_ids=ids, attention_mask=mask, labels=labels, mm_encoder_outputs=cached).loss


def train(out_dir, *, seed: int = 0, config: NonNativeConfig = NonNativeConfig(), progress: bool = True) -> dict:
    """CLIP pre-training, text-only LM pre-training, then projector (+ LM) tuning; save to ``out_dir``."""
    seed_all(seed)
    model, processor = build(config)
    tok = processor.tokenizer
    scenes = training_scenes(config.n_images, seed)
    pixels = processor.image_processor(render(scenes), return_tensors="pt")["pixel_values"]

    clip = cliplib.new_clip(model.config.vision_config, tok)  # type: ignore[arg-type]  # transformers types sub-configs as dict | config | None
    clip_phase = cliplib.train_clip(
        clip,
        pixels,
        scenes,
        tok,
        steps=config.clip_steps,
        batch_size=config.clip_batch_size,
        seed=seed,
        progress=progress,
    )
    heldout = synthetic_captions(min(500, config.n_images), DEFAULT_SEED)
    heldout_pixels = processor.image_processor([e.load_image() for e in heldout], return_tensors="pt")["pixel_values"]
    clip_scores = cliplib.retrieval_accuracy(clip, heldout_pixels, [e.meta["scene"] for e in heldout], tok)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.model.vision_tower.eval().requires_grad_(False)

    rows = Rows(processor, scenes, seed)
    llama = LlamaForCausalLM(model.config.text_config)  # type: ignore[arg-type]  # transformers types sub-configs as dict | config | None
    text_stream = batches(len(scenes), config.batch_size, seed + 3)

    def text_step(_):
        ids, mask = pad_rows([rows.text_only(int(i)) for i in next(text_stream)], tok.pad_token_id)
        return llama(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss

    llama.train()
    text_phase = run_phase(
        Phase("text", config.text_steps, config.batch_size, config.lr),
        llama.parameters(),
        text_step,
        weight_decay=config.weight_decay,
        progress=progress,
    )
    model.model.language_model.load_state_dict(llama.model.state_dict())
    model.lm_head.load_state_dict(llama.lm_head.state_dict())

    features = image_features(model, pixels)
    stream = batches(len(scenes), config.batch_size, seed + 4)

    def mm_step(captions_only):
        def step(_):
            idx = next(stream)
            pairs = [rows.multimodal(int(i), captions_only) for i in idx]
            ids, mask = pad_rows([p[0] for p in pairs], tok.pad_token_id)
            labels, _ = pad_rows([p[1] for p in pairs], -100)
            return multimodal_loss(model, ids, mask, labels, features[idx])

        return step

    model.train()
    projector = list(model.model.multi_modal_projector.parameters())
    decoder = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    for p in decoder:
        p.requires_grad_(False)
    align = run_phase(
        Phase("align", config.align_steps, config.batch_size, config.lr), projector, mm_step(True), progress=progress
    )
    for p in decoder:
        p.requires_grad_(True)
    instruct = run_phase(
        Phase("instruct", config.steps, config.batch_size, config.lr / 2),
        projector + decoder,
        mm_step(False),
        weight_decay=config.weight_decay,
        progress=progress,
    )
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {
        "architecture": "LlavaForConditionalGeneration (model_type llava; CLIP vision tower, Llama decoder)",
        "config": asdict(config),
        "parameters": {
            "vision_tower": sum(p.numel() for p in model.model.vision_tower.parameters()),
            "projector": sum(p.numel() for p in projector),
            "decoder": sum(p.numel() for p in decoder),
        },
        "clip_heldout_retrieval": clip_scores,
        "phases": {p.name: p.summary() for p in [clip_phase, text_phase, align, instruct]},
    }
