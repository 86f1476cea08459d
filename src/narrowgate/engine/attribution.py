"""Attribution patching on the attention edges: a first-order estimate of every knockout ``j -> target`` at once."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .interventions import Knockout
from .state import InterventionError, Plan

if TYPE_CHECKING:
    from ..vlm import VLM
    from .shared import SharedPrefix


def attribute(
    vlm: VLM, prefix: SharedPrefix, *, target: str | tuple = "text", mode: str = "mask"
) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order estimate, for every key position j, of knocking out ``j -> target`` at every layer.

    One suffix pass with autograd and one backward (attribution patching on the attention edges): with
    A the attention probabilities of the target rows and G = dM/dA, where M is the log-probability at
    ``last`` of the model's own next token, the knockout changes row i by dA (``mask``: A_ij -> 0 and the
    rest renormalised, dA_ik = A_ik A_ij / (1 - A_ij); ``zero``: A_ij -> 0), and the estimate is
    sum over layers, heads and target rows of <G_i, dA_i>. Returns the estimated change of M
    ([B, T], float32, CPU; negative = the knockout lowers it) and the next tokens ([B]).
    """
    if mode not in ("mask", "zero"):
        raise ValueError(f"mode must be 'mask' or 'zero', got {mode!r}.")
    if vlm.mixers:
        kind, module = next(iter(vlm.mixers.values()))
        raise InterventionError(
            f"The first-order estimate differentiates attention probabilities, and decoder layers {sorted(vlm.mixers)} "
            f"of this {vlm.family.name} model are {kind.name} ({type(module).__name__}), which has none: it would "
            "leave out every path through them. Scan exactly (gate-scan --method exact; VLM.forward_knockouts)."
        )
    batch, P = prefix.batch, prefix.length
    rows = vlm._plan(batch, knockouts=(Knockout("image", target),)).knockouts[0].target.prompt[:, P:]
    with torch.enable_grad():
        logits, run = vlm.runner.suffix_pass(prefix, Plan(vlm.layer_of, vlm.n_layers, record_probs=True), 1)
        probs = run.record.probs
        top = logits.argmax(-1)
        metric = torch.log_softmax(logits, -1).gather(1, top[:, None]).sum()
        layers = sorted(probs)
        grads = torch.autograd.grad(metric, [probs[l] for l in layers])
    est = torch.zeros(batch.size, batch.length)
    sel = rows.to(grads[0].device)[:, None, :, None].float()  # [B, 1, Q, 1]
    for l, G in zip(layers, grads):
        A = probs[l].detach()
        if mode == "zero":
            edge = -A * G
        else:
            S = (A * G).sum(-1, keepdim=True)
            edge = A / (1 - A).clamp(min=torch.finfo(A.dtype).tiny) * (S - G)
        est += (edge * sel).sum((1, 2)).cpu()
    return est, top.cpu()
