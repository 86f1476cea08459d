"""What both organisms share: training scenes, task examples in the experiments' prompt formats,
the locally trained tokenizer, and the optimisation loop.

Training scenes come from their own random stream (``narrowgate-organisms:<seed>``), so they are
never the scenes of the experiments' synthetic data (`narrowgate.data.synthetic_*`, which the
held-out evaluation uses).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from transformers import PreTrainedTokenizerFast

from ..data.prompts import CAPTION, CLASS, VQA
from ..data.synthetic import COLORS, POSITIONS, QUESTIONS, SHAPES, Scene, make_scene, render_scene, scene_captions
from ..progress import progress_bar
from .tiny import bpe_tokenizer

CLASS_PROMPT = CLASS["synthetic"]
#: The prompts every organism learns, written beside its config as ``narrowgate.json`` so that every command
#: asks it those (and not a family preset such as Chameleon's VQA prompt ending in " Answer:").
PROMPTS = {"vqa": VQA, "captions": CAPTION, "class": CLASS_PROMPT}
#: Share of each understanding task in the multimodal training mixture.
TASK_MIX = {"vqa": 0.5, "caption": 0.3, "class": 0.2}
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
THREADS = 2


@dataclass(frozen=True)
class Recipe:
    """What both recipes size alike: training images, the decoder, and the main phase's schedule."""

    n_images: int = 10000
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.1


def decoder_config(config: Recipe, tokenizer) -> dict:
    """The decoder's config fields (Llama-style sizes) for ``config`` and ``tokenizer``."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=3 * config.hidden,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch, and fix torch to `THREADS` CPU threads."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)


def training_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` training scenes from the organisms' own stream (disjoint from the experiments' data)."""
    rng = random.Random(f"narrowgate-organisms:{seed}")
    return [make_scene(rng) for _ in range(n)]


def render(scenes: list[Scene]) -> list[Image.Image]:
    """The ``scenes`` drawn as images, in order, for the image processor."""
    return [render_scene(s) for s in scenes]


@dataclass(frozen=True)
class Example:
    """One training example: an understanding task on a scene, as prompt and target text.

    ``target`` starts with a space, as the continuation of the prompt ("This shape is a" + " circle").
    """

    task: str
    prompt: str
    target: str


def task_example(scene: Scene, rng: random.Random) -> Example:
    """A VQA, caption or class example for ``scene``, drawn with the weights of `TASK_MIX`."""
    task = rng.choices(tuple(TASK_MIX), weights=tuple(TASK_MIX.values()))[0]
    if task == "vqa":
        kind = rng.choice(tuple(QUESTIONS))
        return Example(task, VQA.format(question=QUESTIONS[kind]), " " + getattr(scene, kind))
    if task == "caption":
        return Example(task, CAPTION, " " + rng.choice(scene_captions(scene)))
    return Example(task, CLASS_PROMPT, " " + scene.shape)


def description(scene: Scene, rng: random.Random) -> str:
    """A text-only document about a scene: a caption, then its questions answered, in random order."""
    facts = [f"{QUESTIONS[k]} {getattr(scene, k)}." for k in QUESTIONS] + [f"{CLASS_PROMPT} {scene.shape}."]
    rng.shuffle(facts)
    return " ".join([rng.choice(scene_captions(scene)).capitalize() + "."] + facts)


def corpus() -> list[str]:
    """Every text the organisms read or write: all captions, prompts, questions and answers."""
    prompts = [CAPTION, CLASS_PROMPT, "USER: ASSISTANT:"] + [VQA.format(question=q) for q in QUESTIONS.values()]
    texts = prompts * 100  # as frequent as in training, so that the prompts get merged into few tokens
    rng = random.Random(0)
    for shape, color, position in product(SHAPES, COLORS, POSITIONS):
        scene = Scene(shape, color, position, 64, 0.0, 0.0, 1.0)
        texts += list(scene_captions(scene)) + [description(scene, rng)]
    return texts


def train_tokenizer(special_tokens: list[str], *, vocab_size: int = 512, **extra) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `corpus`, adding BOS, with the family's special tokens."""
    return bpe_tokenizer(corpus(), special_tokens, vocab_size=vocab_size, bos=BOS, eos=EOS, pad=PAD, unk=UNK, **extra)


def pad_rows(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into ``(ids, attention_mask)``."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


@dataclass
class Phase:
    """One optimisation phase: its settings, the loss curve and the time it took."""

    name: str
    steps: int
    batch_size: int
    lr: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        """The phase as the organism's card records it: settings, first loss, final loss (the mean of the last
        fifth of the steps, 1 to 20 of them, so one noisy batch does not set it) and seconds."""
        tail = self.losses[-max(1, min(20, len(self.losses) // 5)) :]
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "first_loss": round(self.losses[0], 4) if self.losses else None,
            "final_loss": round(float(np.mean(tail)), 4) if tail else None,
            "seconds": round(self.seconds, 1),
        }


def run_phase(phase: Phase, params, step_fn, *, weight_decay: float = 0.0, progress: bool = True) -> Phase:
    """AdamW with linear warm-up and cosine decay to 10%; ``step_fn(step)`` returns the loss to minimise.

    Weight decay applies to matrices only (not to norms, biases or other vectors).
    """
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=phase.lr, betas=(0.9, 0.95))
    warm = max(1, phase.steps // 20)

    def factor(s):
        if s < warm:
            return (s + 1) / warm
        t = (s - warm) / max(1, phase.steps - warm)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    start = time.perf_counter()
    with progress_bar("loss {task.fields[loss]}", disable=not progress, console=Console(stderr=True)) as bar:
        task = bar.add_task(phase.name, total=phase.steps, loss="-")
        for step in range(phase.steps):
            loss = step_fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            phase.losses.append(float(loss.detach()))
            bar.update(task, advance=1, loss=f"{phase.losses[-1]:.4f}")
    phase.seconds = time.perf_counter() - start
    return phase


def batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """An endless stream of index batches: seeded reshuffles of ``range(n)``."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]
