"""Training with interventions: prompts with their answers appended, and the answer loss (`VLM.intervening` keeps
the interventions on under autograd; `narrowgate.finetune` trains with these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .batch import Batch

if TYPE_CHECKING:
    from .vlm import VLM


@dataclass
class TrainingBatch:
    """A prompt batch with each example's answer appended (right-padded) and its loss labels.

    ``labels`` is [B, T]: the answer tokens (and the closing EOS) where the loss applies, -100
    elsewhere. ``batch``'s roles keep their prompt positions; ``text`` also covers the answer.
    ``answer_length`` is the width of the appended block (the loss needs only that many logits + 1).
    """

    batch: Batch
    labels: torch.Tensor
    answer_length: int


def prepare_training(vlm: VLM, images, prompts, answers, *, image_first: bool = True) -> TrainingBatch:
    """`VLM.prepare` the prompts, then append each answer (a continuation of its prompt) and EOS.

    The answers are tokenised without special tokens and right-padded, so every prompt keeps
    the positions `VLM.prepare` gives it; other per-token inputs are extended with zeros.
    """
    if isinstance(answers, str):
        answers = [answers]
    answers = list(answers)
    batch = vlm.prepare(images, prompts, image_first=image_first)
    if len(answers) != batch.size:
        raise ValueError(f"prepare_training() got {batch.size} prompts but {len(answers)} answers.")
    tok = vlm.family.tokenizer
    if tok.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token to close the answers with.")
    rows = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers]
    A = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((batch.size, A), pad, dtype=batch.input_ids.dtype)
    mask = torch.zeros((batch.size, A), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    shape = batch.input_ids.shape
    inputs = {}
    for k, v in batch.inputs.items():
        if k == "input_ids":
            v = torch.cat([v, ids], 1)
        elif k == "attention_mask":
            v = torch.cat([v, mask.to(v.dtype)], 1)
        elif isinstance(v, torch.Tensor) and v.shape == shape and k != "pixel_values":
            v = torch.cat([v, v.new_zeros(shape[0], A)], 1)
        inputs[k] = v
    labels = torch.full((batch.size, shape[1] + A), -100, dtype=torch.long)
    labels[:, shape[1] :] = ids.masked_fill(mask == 0, -100)
    out = Batch(inputs=inputs, layouts=batch.layouts, first=batch.first, bos_id=batch.bos_id)
    return TrainingBatch(out, labels, A)


def answer_logits(vlm: VLM, tb: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits [B, A, V] over the answer block and their labels [B, A] (-100: no loss).

    Asks the model for the last ``answer_length + 1`` positions' logits only, where it supports that.
    Call inside `VLM.intervening` for interventions; gradients flow unless the caller disables them.
    """
    logits = vlm.model(**vlm.model_inputs(tb.batch), use_cache=False, **vlm._keep_last(tb.answer_length + 1)).logits
    labels = tb.labels[:, -logits.shape[1] :].to(logits.device)
    return logits[:, :-1], labels[:, 1:]


def answer_loss(vlm: VLM, tb: TrainingBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens (see `answer_logits`)."""
    logits, labels = answer_logits(vlm, tb)
    wide = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(wide, labels.flatten(), ignore_index=-100)
