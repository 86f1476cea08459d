"""The gated organism: the native recipe with a narrow gate planted by training (a positive control).

Everything is the native organism's (`native`: same Chameleon, VQ tokenizer, data and schedule),
except that during training the knockout ``image -> text`` is active in mask mode at every layer:
positions after ``<eoss>`` ([EOI]) never attend to an image token, while [EOI] itself still does.
The answer can only come from what [EOI] carries, so the image reaches the text through one
token, by construction. It is shipped as a stock checkpoint (no mask at inference): the card
checks, without any intervention active, that the text still reads the image through [EOI] only.

Text rows never learned what to do with image keys, since they never saw them, so the stock checkpoint
reads garbage from them. Two optional last phases teach the stock model to ignore them:
``distil_steps`` (self-distillation: the stock forward learns to match the masked forward of a frozen
copy, a target in which the image reaches the text through [EOI] only, plus ``distil_penalty`` times
the attention mass that text positions put on image tokens, so that the stock text does not learn to
read the image content again) and ``unmasked_steps`` (plain next-token training without the mask at a
low learning rate). The card records every attempt and its scores.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..batch import Batch
from ..engine.interventions import Knockout
from ..families.base import ImageLayout
from ..vlm import VLM
from . import native
from .common import Phase
from .heldout import evaluate

#: The knockout active while training: no text position attends to an image token; [EOI] is kept.
TRAINING_KNOCKOUT = Knockout("image", "text", mode="mask")
#: The ablation conditions the gate is checked with: the paper's zero mode (as the ablation experiment runs
#: them) and mask mode (exactly blind).
CHECKS = (
    Knockout("eoi", "text"),
    Knockout("image", "text"),
    Knockout("eoi", "text", mode="mask"),
    Knockout("image", "text", mode="mask"),
)
#: Held-out sizes of the gate checks (every condition on the same examples).
CHECK_SIZES = {"vqa": 150, "captions": 50, "classes": 10}

RECIPE = native.RECIPE + [
    "During training the knockout image -> text is active in mask mode at every decoder layer (narrowgate's own "
    "engine, under autograd): text positions never attend to image tokens, [EOI] (<eoss>) does. The gate is "
    "planted, not emergent.",
    "Then self-distillation without the mask (300 steps, lr 5e-4, same schedule, eager attention): the stock forward "
    "learns to match the masked forward of a frozen copy (KL at every text position) plus 1.0 x the attention mass "
    "that text positions put on image tokens (mean over layers, heads and text positions), so that the stock "
    "checkpoint ignores the image keys its text rows never saw and its text reads the image through [EOI] only.",
]


@dataclass(frozen=True)
class GatedConfig(native.NativeConfig):
    """The native recipe plus optional final phases without the mask (0 steps: none)."""

    distil_steps: int = 300
    distil_lr: float = 5e-4
    distil_penalty: float = 1.0
    unmasked_steps: int = 0
    unmasked_lr: float = 2e-4


TINY = GatedConfig(**{**native.TINY.__dict__, "distil_steps": 3, "unmasked_steps": 4})


def layout(row: list[int], boi: int, eoi: int) -> ImageLayout:
    """Where the image sits in a training row (``<racm3:break>`` codes ``<eoss>``)."""
    b, e = row.index(boi), row.index(eoi)
    return ImageLayout(start=b + 1, end=e - 1, content=list(range(b + 1, e)), boi=b, eoi=e)


def masked_loss(vlm: VLM, seqs: native.Sequences, knockouts=(TRAINING_KNOCKOUT,)) -> native.RowLoss:
    """`native.next_token_loss` with ``knockouts`` active on each batch of training rows."""

    def loss(ids, mask, rows):
        lays = [layout(r, seqs.boi, seqs.eoi) for r in rows]
        batch = Batch({"input_ids": ids, "attention_mask": mask}, lays, [0] * len(rows), bos_id=seqs.bos)
        with vlm.intervening(batch, knockouts=knockouts):
            return native.next_token_loss(vlm.model, ids, mask)

    return loss


def image_attention(attentions, image: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Attention mass on the ``image`` keys ([B, T] bool), averaged over layers, heads and the ``rows`` queries.

    ``attentions``: one [B, H, T, T] probability tensor per layer (``output_attentions``).
    """
    mass = torch.stack([(a.float() * image[:, None, None, :]).sum(-1).mean(1) for a in attentions]).mean(0)
    return (mass * rows).sum() / rows.sum().clamp(min=1)


def distil_loss(model, teacher: VLM, seqs: native.Sequences, penalty: float = 0.0) -> native.RowLoss:
    """KL(masked teacher || stock student) of the next-token distributions at every text position of a row, plus
    ``penalty`` x the student's attention mass from text positions on image tokens (`image_attention`; needs
    ``model`` in eager attention, which returns its probabilities)."""

    def loss(ids, mask, rows):
        lays = [layout(r, seqs.boi, seqs.eoi) for r in rows]
        batch = Batch({"input_ids": ids, "attention_mask": mask}, lays, [0] * len(rows), bos_id=seqs.bos)
        with torch.no_grad(), teacher.intervening(batch, knockouts=(TRAINING_KNOCKOUT,)):
            target = torch.log_softmax(teacher.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        out = model(input_ids=ids, attention_mask=mask, output_attentions=bool(penalty))
        keep = mask.bool() & batch.mask("text", require=False)
        t, s = target[keep], torch.log_softmax(out.logits.float(), -1)[keep]
        kl = (t.exp() * (t - s)).sum(-1).mean()
        if not penalty:
            return kl
        return kl + penalty * image_attention(out.attentions, batch.mask("image"), keep.float())

    return loss


def relative(score: float, base: float, chance: float) -> float:
    """(score - chance) / (baseline - chance): 1 at the baseline, 0 at chance."""
    return (score - chance) / (base - chance) if base > chance else float("nan")


def gate_checks(out_dir, sizes: dict | None = None) -> dict:
    """Held-out scores with no knockout and with each of `CHECKS`, and each relative to baseline over chance."""
    sizes = sizes or CHECK_SIZES
    conditions = {"baseline": ()} | {k.name: (k,) for k in CHECKS}
    scores = {name: evaluate(out_dir, sizes=sizes, knockouts=kos) for name, kos in conditions.items()}

    def flat(h):
        return {
            "vqa": (h["vqa"]["accuracy"], h["vqa"]["chance"]),
            "captions": (h["captions"]["cider"], h["captions"]["chance"]),
            "classes": (h["classes"]["accuracy"], h["classes"]["chance"]),
        }

    base = flat(scores["baseline"])
    table = {}
    for name, h in scores.items():
        f = flat(h)
        row: dict[str, Any] = {
            task: {"score": s, "chance": c, "relative": round(relative(s, base[task][0], c), 4)}
            for task, (s, c) in f.items()
        }
        row["mean_relative"] = round(float(np.mean([r["relative"] for r in row.values()])), 4)
        table[name] = row
    return {
        "sizes": sizes,
        "mode": "zero (the paper's) and mask (':mask'); no intervention is active in the checkpoint itself",
        "conditions": table,
    }


def train(
    out_dir,
    *,
    seed: int = 0,
    config: GatedConfig = GatedConfig(),
    progress: bool = True,
    checkpoints: dict | None = None,
) -> dict:
    """Train like `native.train` with `TRAINING_KNOCKOUT` active, then optionally without it; save to ``out_dir``.

    ``checkpoints`` maps a phase name ("lm") to a directory where the model is also saved after that
    phase (to measure it on its own).
    """
    model, processor, seqs, vq_phases = native.setup(config, seed, progress)
    vlm = VLM(model, processor)
    lm = native.lm_phase(
        model,
        seqs,
        Phase("lm", config.steps, config.batch_size, config.lr),
        config,
        seed,
        progress,
        loss=masked_loss(vlm, seqs),
    )
    vlm.close()
    phases = [*vq_phases, lm]
    for name, path in (checkpoints or {}).items():
        if name == "lm":
            model.save_pretrained(path)
            processor.save_pretrained(path)
    if config.distil_steps:
        teacher = VLM(copy.deepcopy(model).eval().requires_grad_(False), processor)
        if config.distil_penalty:
            model.set_attn_implementation("eager")
        phases.append(
            native.lm_phase(
                model,
                seqs,
                Phase("distil", config.distil_steps, config.batch_size, config.distil_lr),
                config,
                seed + 7,
                progress,
                loss=distil_loss(model, teacher, seqs, config.distil_penalty),
            )
        )
        model.set_attn_implementation("sdpa")
        teacher.close()
    if config.unmasked_steps:
        phases.append(
            native.lm_phase(
                model,
                seqs,
                Phase("unmasked", config.unmasked_steps, config.batch_size, config.unmasked_lr),
                config,
                seed + 7,
                progress,
            )
        )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    info = native.info(model, config, seqs, phases)
    info["architecture"] = "ChameleonForConditionalGeneration (model_type chameleon), gate planted in training"
    info["gate"] = gate_checks(out_dir)
    return info
