"""The native organism: a stock Chameleon trained from scratch, early fusion, loss on every token.

Recipe (the paper's multimodal-output models, Sec. 3.1): a VQ image tokenizer (`vq`) turns each
image into 64 discrete codes (``image_tokens``) that live in the same vocabulary as the text (``IMGIMG...Z`` tokens);
the image is written ``<racm3:break>`` codes ``<eoss>``, exactly as `ChameleonProcessor` lays it
out. The decoder starts from random weights, and the next-token loss runs over all positions,
image tokens included. Sequences are the understanding tasks with the image first (VQA, caption,
class prompts in the experiments' formats, answer, ``</s>``) and, for a share of them, caption
then image (text-to-image generation, as a multimodal-output model is also trained to do).

The stock ``forward`` masks the image-token logits (it generates text only); training reads the
logits from ``lm_head`` directly so that image tokens are predicted too.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import (
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    ChameleonImageProcessorPil,
    ChameleonProcessor,
)

from ..data.synthetic import scene_captions
from . import vq as vqlib
from .common import (
    EOS,
    Example,
    Phase,
    Recipe,
    batches,
    decoder_config,
    pad_rows,
    render,
    run_phase,
    seed_all,
    task_example,
    train_tokenizer,
    training_scenes,
)

SPECIAL = ["<image>", "<racm3:break>", "<eoss>", "<reserved08706>"]
#: Codes per image of the shipped recipe (`NativeConfig.image_tokens`).
IMAGE_SEQ_LENGTH = (vqlib.RESOLUTION // vqlib.DOWNSAMPLE) ** 2
#: A training loss on a batch of rows: ``loss(ids, attention_mask, rows)`` (`lm_phase`'s ``loss``).
RowLoss = Callable[[torch.Tensor, torch.Tensor, list[list[int]]], torch.Tensor]


@dataclass(frozen=True)
class NativeConfig(Recipe):
    """Sizes and schedule; the defaults are the shipped recipe."""

    codebook: int = 512
    vq_channels: int = 32
    vq_embed_dim: int = 16
    vq_steps: int = 1500
    generation_share: float = 0.2
    image_tokens: int = IMAGE_SEQ_LENGTH


def recipe(config: NativeConfig) -> list[str]:
    """The recipe's steps in words, with ``config``'s code grid and share of generation sequences."""
    side = vqlib.codes_side(config.image_tokens)
    return [
        "VQ image tokenizer: Chameleon's VQ-VAE encoder + codebook trained as an autoencoder (reconstruction + VQ "
        f"losses, throwaway decoder) on the training images; {vqlib.RESOLUTION} x {vqlib.RESOLUTION} pixels -> "
        f"{side} x {side} codes.",
        "Codes become IMGIMG...Z tokens of the same vocabulary as the text; an image is <racm3:break> codes <eoss>.",
        "Decoder trained from scratch (no pre-trained weights) with next-token loss on every position, image and text "
        "tokens alike, on image-first task sequences (VQA / caption / class prompt + answer) and caption-then-image "
        f"sequences (text-to-image generation, {config.generation_share:g} of the sequences).",
    ]


RECIPE = recipe(NativeConfig())
TINY = NativeConfig(n_images=48, codebook=16, vq_steps=5, hidden=32, layers=1, heads=2, steps=12, batch_size=8, lr=3e-3)


def image_token_name(code: int) -> str:
    """Chameleon's BPE name of VQ code ``code``: IMGIMG + its digits as letters + Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def build(config: NativeConfig) -> tuple[ChameleonForConditionalGeneration, ChameleonProcessor]:
    """A randomly initialised Chameleon with its processor (tokenizer trained on the organisms' corpus)."""
    tok = train_tokenizer(SPECIAL, sep_token="<reserved08706>")
    tok.add_tokens([image_token_name(i) for i in range(config.codebook)])
    vq = vqlib.vq_config(
        codebook=config.codebook,
        channels=config.vq_channels,
        embed_dim=config.vq_embed_dim,
        image_tokens=config.image_tokens,
    )
    model_config = ChameleonConfig(
        **decoder_config(config, tok), vq_config=vq.to_dict(), vocabulary_map=tok.get_vocab()
    )
    model = ChameleonForConditionalGeneration(model_config)
    size = vqlib.RESOLUTION
    image_processor = ChameleonImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor = ChameleonProcessor(
        image_processor=image_processor, tokenizer=tok, image_seq_length=config.image_tokens, image_token="<image>"
    )
    return model, processor


class Sequences:
    """Token rows for training, laid out exactly as the processor lays out the same prompt."""

    def __init__(
        self, processor: ChameleonProcessor, image_tokens: torch.Tensor, scenes, generation_share: float, seed: int
    ):
        tok = processor.tokenizer
        self.tok = tok
        self.image_tokens = image_tokens
        self.scenes = scenes
        self.share = generation_share
        self.rng = random.Random(f"native-sequences:{seed}")
        self.boi = tok.convert_tokens_to_ids(processor.image_start_token)
        self.eoi = tok.convert_tokens_to_ids(processor.image_end_token)
        self.bos, self.eos = tok.bos_token_id, tok.convert_tokens_to_ids(EOS)
        self._cache: dict[str, list[int]] = {}

    def text(self, s: str) -> list[int]:
        """Token ids of ``s`` without special tokens, cached: the same prompts and answers recur on every row."""
        if s not in self._cache:
            self._cache[s] = self.tok(s, add_special_tokens=False)["input_ids"]
        return self._cache[s]

    def image(self, i: int) -> list[int]:
        """Image ``i`` as the processor writes it: ``<racm3:break>``, its VQ codes, ``<eoss>``."""
        return [self.boi] + self.image_tokens[i].tolist() + [self.eoi]

    def understanding(self, i: int, ex: Example) -> list[int]:
        """``<s>`` image, prompt, answer, ``</s>``."""
        return [self.bos] + self.image(i) + self.text(ex.prompt) + self.text(ex.target) + [self.eos]

    def generation(self, i: int, caption: str) -> list[int]:
        """``<s>`` caption, image, ``</s>`` (text-to-image)."""
        return [self.bos] + self.text(caption) + self.image(i) + [self.eos]

    def row(self, i: int) -> list[int]:
        """A random training row for image ``i``: generation with probability ``generation_share``."""
        scene = self.scenes[i]
        if self.rng.random() < self.share:
            return self.generation(i, self.rng.choice(scene_captions(scene)))
        return self.understanding(i, task_example(scene, self.rng))


def next_token_loss(model: ChameleonForConditionalGeneration, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every real position (text and image tokens alike)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def setup(
    config: NativeConfig, seed: int, progress: bool = True
) -> tuple[ChameleonForConditionalGeneration, ChameleonProcessor, Sequences, list[Phase]]:
    """Build the model, train the VQ tokenizer and tokenize the training images.

    Returns the model, processor, training `Sequences` and the VQ phases.
    """
    seed_all(seed)
    model, processor = build(config)
    scenes = training_scenes(config.n_images, seed)
    pixels = processor.image_processor(render(scenes), return_tensors="pt")["pixel_values"]

    vq = vqlib.new_vq(model.config.vq_config)  # type: ignore[arg-type]  # transformers types sub-configs as dict | config | None
    vq_phases = vqlib.train_vq(vq, pixels, steps=config.vq_steps, seed=seed, progress=progress)
    model.model.vqmodel.load_state_dict(vq.state_dict())
    model.model.vqmodel.eval().requires_grad_(False)
    with torch.no_grad():
        image_tokens = torch.cat([model.get_image_tokens(pixels[i : i + 256]) for i in range(0, len(pixels), 256)])
    return model, processor, Sequences(processor, image_tokens, scenes, config.generation_share, seed), vq_phases


def lm_parameters(model) -> list:
    """The parameters next-token training updates: all but the VQ tokenizer's, which `setup` trained and froze."""
    return [p for n, p in model.named_parameters() if not n.startswith("model.vqmodel.")]


def lm_phase(
    model,
    seqs: Sequences,
    phase: Phase,
    config: NativeConfig,
    seed: int,
    progress: bool = True,
    loss: RowLoss | None = None,
) -> Phase:
    """One phase of next-token training on ``seqs``; ``loss(ids, mask, rows)`` replaces `next_token_loss`."""
    stream = batches(len(seqs.scenes), phase.batch_size, seed + 1)
    pad = seqs.tok.pad_token_id
    model.train()

    def step(_):
        rows = [seqs.row(int(i)) for i in next(stream)]
        ids, mask = pad_rows(rows, pad)
        return next_token_loss(model, ids, mask) if loss is None else loss(ids, mask, rows)

    out = run_phase(phase, lm_parameters(model), step, weight_decay=config.weight_decay, progress=progress)
    model.eval()
    return out


def info(model, config: NativeConfig, seqs: Sequences, phases: list[Phase]) -> dict:
    """What the card records of a trained native-style organism: its architecture and config, parameter counts
    (decoder, VQ), how many codebook entries the training images use, and each phase's summary."""
    return {
        "architecture": "ChameleonForConditionalGeneration (model_type chameleon)",
        "config": asdict(config),
        "parameters": {
            "decoder": sum(p.numel() for p in lm_parameters(model)),
            "vq": sum(p.numel() for p in model.model.vqmodel.parameters()),
        },
        "codebook_usage": int(seqs.image_tokens.unique().numel()),
        "phases": {p.name: p.summary() for p in phases},
    }


def train(out_dir, *, seed: int = 0, config: NativeConfig = NativeConfig(), progress: bool = True) -> dict:
    """Train the VQ tokenizer, then the decoder from scratch; save model + processor to ``out_dir``."""
    model, processor, seqs, vq_phases = setup(config, seed, progress)
    lm = lm_phase(model, seqs, Phase("lm", config.steps, config.batch_size, config.lr), config, seed, progress)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return info(model, config, seqs, [*vq_phases, lm])
