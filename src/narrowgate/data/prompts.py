"""The paper's prompts and input sizes, per-family presets that reproduce each published setting, and class-name scoring.

Presets (each family's chat template is applied by its adapter): the defaults are the paper's
prompts; where the authors used a different one for a model, the preset reproduces it:

- Chameleon, VQA: the authors' prompt ends with " Answer:" (their VQA evaluation code).
- Chameleon-34B (48 decoder layers), every ImageNet input (cross-attention, overlap, the ImageNet
  ablation, patching, steering): "Answer the question using a single word, number, or short phrase.
  This animal is a" (SM 7.4 names it for patching; the authors' code uses it for every ImageNet prompt of
  that model: it refused the plain one).

A checkpoint's own ``narrowgate.json`` (`narrowgate.checkpoint_prompts`) comes before the presets: the
prompts a model was trained on are the ones it answers. `resolve` writes the prompts a run uses into
its config (so the manifest shows them, with where each came from); ``--prompt``, ``--vqa-prompt``
and ``--caption-prompt`` override both.

Image size (`image_size`): the authors resize Pixtral's images to 512 x 512 (1,024 image tokens and 32
row ends) everywhere but their VQA and captioning scripts, which keep the processor's own sizing;
every other family keeps the processor's sizing.

`resolve_image_size` writes the size a run uses into its config; ``--image-size`` overrides it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..parsing import parse_image_size

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

VQA = "{question}\nAnswer the question using a single word or phrase."
CAPTION = "Provide a one-sentence caption for the provided image."
CLASS = {"imagenet": "This animal is a", "synthetic": "This shape is a"}
NEW_TOKENS = {"vqa": 20, "captions": 60}
LONG_CLASS = "Answer the question using a single word, number, or short phrase. This animal is a"

#: (family, n_layers or None for any size, prompt kind, dataset or None for any) -> prompt.
PRESETS = {
    ("chameleon", None, "vqa", None): VQA + " Answer:",
    ("chameleon", 48, "class", "imagenet"): LONG_CLASS,
    ("chameleon", 48, "class_patching", "imagenet"): LONG_CLASS,
}
#: The processor's own image sizing (no resize before it).
PROCESSOR = "processor"
#: (family, generates text) -> image size preset; the authors' Pixtral inputs outside VQA and captioning.
IMAGE_SIZES = {("pixtral", False): "512x512"}
#: Config key of each prompt kind.
KEYS = {"class": "prompt", "class_patching": "prompt", "vqa": "vqa_prompt", "captions": "caption_prompt"}


def preset(kind: str, family: str, n_layers: int, dataset: str | None) -> str:
    """The prompt of ``kind`` (class, class_patching, vqa, captions) for a model of ``family`` on ``dataset``."""
    for (fam, layers, k, data), text in PRESETS.items():
        if fam == family and k == kind and layers in (None, n_layers) and data in (None, dataset):
            return text
    if kind in ("class", "class_patching"):
        return CLASS.get(dataset or "imagenet", CLASS["imagenet"])
    return {"vqa": VQA, "captions": CAPTION}[kind]


def resolve(given: dict, kinds, family: str, n_layers: int, checkpoint=None) -> dict:
    """``given`` (settings by name) with the prompt of every kind in ``kinds`` filled in: a user's setting, else the checkpoint's
    own (``checkpoint``, its `narrowgate.checkpoint_prompts.CheckpointPrompts`), else the family preset."""
    return {**given, **{key: text for key, (text, _) in sources(given, kinds, family, n_layers, checkpoint).items()}}


def sources(given: dict, kinds, family: str, n_layers: int, checkpoint=None) -> dict[str, tuple[str, str]]:
    """Setting name -> (prompt, where it comes from: the option, the checkpoint's narrowgate.json, the preset), for
    the prompt kinds ``kinds`` of a run whose settings (by name) are ``given``."""
    out = {}
    dataset = given.get("data")
    for kind in kinds:
        key = KEYS[kind]
        own = checkpoint.get(kind, dataset) if checkpoint is not None else None
        if given.get(key):
            out[key] = (given[key], "--" + key.replace("_", "-"))
        elif own is not None:
            out[key] = (own, checkpoint.path or "narrowgate.json")
        else:
            out[key] = (preset(kind, family, n_layers, dataset), f"{family} family preset")
    return out


def resolve_image_size(given: dict, family: str, generates: bool) -> dict:
    """``given`` (settings by name) with ``image_size`` filled in from the family's preset (a user's value is kept,
    normalised)."""
    size_given = given.get("image_size")
    if size_given:
        size = parse_image_size(size_given)
        value = PROCESSOR if size is None else f"{size[0]}x{size[1]}"
    else:
        value = IMAGE_SIZES.get((family, generates), PROCESSOR)
    return {**given, "image_size": value}


def resize(image: PILImage, size: tuple[int, int] | None) -> PILImage:
    """``image`` resized to ``size`` (width, height) with bilinear filtering — the authors' torchvision resize of a
    PIL image — or unchanged for None."""
    from PIL import Image

    return image if size is None or image.size == size else image.resize(size, Image.Resampling.BILINEAR)


def class_prompt(prompt: str | None, dataset: str | None) -> str:
    """The class prompt: ``prompt`` (``--prompt``, or the run's resolved one), else the paper's for ``dataset``."""
    return prompt or CLASS.get(dataset or "imagenet", CLASS["imagenet"])


def vqa_prompt(template: str | None, question: str) -> str:
    """The VQA prompt of ``question``: ``template`` (``--vqa-prompt``, with ``{question}``), else the paper's."""
    template = template or VQA
    if "{question}" not in template:
        raise ValueError(f"--vqa-prompt {template!r} has no {{question}} placeholder for the question.")
    return template.format(question=question)


def caption_prompt(prompt: str | None) -> str:
    """The caption prompt: ``prompt`` (``--caption-prompt``, or the run's resolved one), else the paper's."""
    return prompt or CAPTION


def word_token(tokenizer, word: str) -> int:
    """The class word's first token (of " <word>", leading space): the organisms' one-token shape names."""
    ids = name_ids(tokenizer, word)
    return ids[0]


def name_ids(tokenizer, word: str) -> list[int]:
    """Every token of " <word>" (leading space, as it follows the prompt), derived, never hand-picked."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"The tokenizer turns {word!r} into no token.")
    return [int(i) for i in ids]


def name_scores(vlm, batch, conditions, names: list[list[int]]) -> tuple[dict, dict]:
    """Teacher-forced score of a whole class name per example and condition, and the next-token logits.

    ``names[b]`` are the token ids of example ``b``'s name. The score is the summed log-probability of
    all its tokens after the prompt, so a class is judged by its whole name, never by a first token
    that two classes can share (" great white shark" / " great grey owl"). Returns
    ``({condition: [B] scores}, {condition: [B, V] logits at the last prompt position})``.
    """
    ext = vlm.extend(batch, [ids[:-1] for ids in names])
    keep = max(len(ids) for ids in names)
    outs = vlm.forward_conditions(ext, conditions, keep=keep)
    scores, first = {}, {}
    for name, out in outs.items():
        tail = out.tail_logits if out.tail_logits is not None else out.last_logits[:, None]
        logp = torch.log_softmax(tail, -1)
        s, f = [], []
        for b, ids in enumerate(names):
            start = keep - len(ids)  # the tail position predicting the name's first token
            s.append(float(sum(logp[b, start + j, t] for j, t in enumerate(ids))))
            f.append(tail[b, start])
        scores[name] = torch.tensor(s)
        first[name] = torch.stack(f)
    return scores, first
