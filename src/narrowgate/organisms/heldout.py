"""Held-out task scores of a saved organism, measured through narrowgate itself (greedy decoding).

The held-out images are the experiments' own synthetic data (`narrowgate.data.synthetic_*` at the
default seed), which the training stream never draws, and the prompts are the experiments'
prompts. Every score comes with its chance level.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..data.base import DEFAULT_SEED
from ..data.prompts import CAPTION, NEW_TOKENS, VQA, word_token
from ..data.synthetic import ATTRIBUTES, POSITION_PHRASES, synthetic_captions, synthetic_classes, synthetic_vqa
from ..metrics import cider, vqa_accuracy
from .common import CLASS_PROMPT

#: Default held-out sizes: VQA questions, captioned images, images per shape class.
SIZES = {"vqa": 300, "captions": 100, "classes": 20}


def _generate(vlm, examples, prompts, max_new_tokens, batch_size, knockouts=()):
    out = []
    for i in range(0, len(examples), batch_size):
        images = [e.load_image() for e in examples[i : i + batch_size]]
        batch = vlm.prepare(images, prompts[i : i + batch_size])
        tokens = vlm.generate(batch, knockouts=knockouts, max_new_tokens=max_new_tokens)
        out += [t.strip() for t in vlm.decode(tokens, batch)]
    return out


def vqa_scores(vlm, n: int, seed: int = DEFAULT_SEED, batch_size: int = 50, knockouts=()) -> dict:
    """VQAv2 accuracy on ``n`` held-out synthetic questions, overall and per kind, vs uniform guessing."""
    examples = synthetic_vqa(n, seed)
    preds = _generate(
        vlm, examples, [VQA.format(question=e.question) for e in examples], NEW_TOKENS["vqa"], batch_size, knockouts
    )
    acc = np.array([vqa_accuracy(p, e.answers) for p, e in zip(preds, examples)])
    kinds = np.array([e.meta["kind"] for e in examples])
    chance = np.array([1 / len(ATTRIBUTES[k]) for k in kinds])
    return {
        "n": n,
        "accuracy": round(float(acc.mean()), 4),
        "chance": round(float(chance.mean()), 4),
        "by_kind": {
            k: {
                "n": int((kinds == k).sum()),
                "accuracy": round(float(acc[kinds == k].mean()), 4),
                "chance": round(1 / len(ATTRIBUTES[k]), 4),
            }
            for k in sorted(set(kinds))
        },
        "examples": [
            {"question": e.question, "answer": e.answers[0], "prediction": p} for e, p in zip(examples[:5], preds[:5])
        ],
    }


def caption_scores(vlm, n: int, seed: int = DEFAULT_SEED, batch_size: int = 50, knockouts=()) -> dict:
    """CIDEr-D of captions of ``n`` held-out images, vs the same captions given to other images.

    Also the share of captions naming the image's colour, shape and position phrase.
    """
    examples = synthetic_captions(n, seed)
    preds = _generate(vlm, examples, [CAPTION] * n, NEW_TOKENS["captions"], batch_size, knockouts)
    refs = {e.id: list(e.references) for e in examples}
    score = cider({e.id: p for e, p in zip(examples, preds)}, refs)[0]
    order = list(range(n))
    random.Random(seed).shuffle(order)
    shuffled = {examples[order[i]].id: preds[order[(i + 1) % n]] for i in range(n)}
    blind = cider(shuffled, refs)[0]
    scenes = [e.meta["scene"] for e in examples]
    mentions = {
        "color": np.mean([f" {s.color} " in f" {p} " for s, p in zip(scenes, preds)]),
        "shape": np.mean([f" {s.shape} " in f" {p} " for s, p in zip(scenes, preds)]),
        "position": np.mean([p.endswith(POSITION_PHRASES[s.position]) for s, p in zip(scenes, preds)]),
    }
    return {
        "n": n,
        "cider": round(float(score), 4),
        "chance": round(float(blind), 4),
        "chance_is": "CIDEr-D of the same captions assigned to other images (image-blind)",
        "names_attribute": {k: round(float(v), 4) for k, v in mentions.items()},
        "examples": [{"references": list(e.references[:2]), "prediction": p} for e, p in zip(examples[:5], preds[:5])],
    }


@torch.no_grad()
def class_scores(vlm, n_per_class: int, seed: int = DEFAULT_SEED, batch_size: int = 60, knockouts=()) -> dict:
    """Top-1 accuracy of the next token after "This shape is a" (over the whole vocabulary) vs 1/6."""
    examples = synthetic_classes(n_per_class, seed)
    tok = vlm.family.tokenizer
    hits = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = vlm.prepare([e.load_image() for e in chunk], [CLASS_PROMPT] * len(chunk))
        top = vlm.forward(batch, knockouts=knockouts).logits[:, -1].argmax(-1)
        hits += [int(t) == word_token(tok, e.word) for t, e in zip(top, chunk)]
    return {
        "n": len(examples),
        "prompt": CLASS_PROMPT,
        "accuracy": round(float(np.mean(hits)), 4),
        "chance": round(1 / len(ATTRIBUTES["shape"]), 4),
    }


def evaluate(out_dir, *, sizes: dict | None = None, seed: int = DEFAULT_SEED, knockouts=()) -> dict:
    """VQA, caption and class scores of the checkpoint in ``out_dir`` (loaded with `narrowgate.load`).

    ``knockouts`` stay active while answering (e.g. to check that a gate is where it was planted).
    """
    import narrowgate

    sizes = {**SIZES, **(sizes or {})}
    vlm = narrowgate.load(out_dir, dtype="float32")
    return {
        "data": f"narrowgate.data.synthetic_* at seed {seed} (held out: never drawn by the training stream)",
        "vqa": vqa_scores(vlm, sizes["vqa"], seed, knockouts=knockouts),
        "captions": caption_scores(vlm, sizes["captions"], seed, knockouts=knockouts),
        "classes": class_scores(vlm, sizes["classes"], seed, knockouts=knockouts),
    }
