"""Sec. 4.2, Eq. 2: how much ImageNet class information the residual stream holds at each role, per layer.

Residuals are captured at ``eoi``, ``first_image`` (the role Chameleon-34B's figure singles out),
``last_image``, ``image[k]`` (the paper's 32nd image token, k = 31, or the last but one when the
image is shorter), the mean over ``internal_image`` tokens, the mean over ``eol`` tokens when the
family has them (Pixtral's [IMG_BREAK]s, SM Fig. 2), and ``last``; the neighbourhood overlap with
the class labels (k = 30) is computed per residual index ``resid`` 0..L (0 = embeddings; the paper
plots layer outputs, resid 1..L: ``--outputs-only``) over all examples. The authors' "32nd image
token" is sequence position 32, content index 30: ``--image-index 30``.

With ``--sweep`` the same captures are also taken under growing early-layer knockout windows
(the authors' ImageNet overlap-with-ablation): ``image -> eoi+text`` knocked out in decoder layers
0..w-1 for w = step, 2 step, ..., L, so the table shows how many early layers [EOI] and the text
need to read the image for the class to be readable at each role.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..engine.interventions import Capture, Knockout
from ..engine.shared import Condition
from ..metrics import neighborhood_overlap_per_layer
from .base import Experiment, check_k, overlap_k, stack
from .prompts import class_prompt

ROLES = ("eoi", "first_image", "last_image", "internal_image", "last")
#: Captured only when every example has the role (families with in-image line breaks).
OPTIONAL_ROLES = ("eol",)
NO_KNOCKOUT = "none"


def image_index(batch, wanted: int) -> int:
    """``wanted`` if every example has that many content tokens, else the last but one."""
    shortest = min(len(lay.content) for lay in batch.layouts)
    return min(wanted, shortest - 2)


def windows(cfg: dict, n_layers: int) -> list[tuple[int, ...]]:
    """Growing early-layer windows 0..w-1 (``--sweep``, step ``--sweep-step``); the last one is every layer."""
    if not cfg.get("sweep"):
        return []
    step = max(1, int(cfg.get("sweep_step") or 1))
    ends = list(range(step, n_layers + 1, step))
    if not ends or ends[-1] != n_layers:
        ends.append(n_layers)
    return [tuple(range(w)) for w in ends]


def conditions(cfg: dict, n_layers: int) -> list[Condition]:
    """The baseline plus ``image -> eoi+text`` knocked out in each window of `windows`."""
    out = [Condition(NO_KNOCKOUT)]
    for layers in windows(cfg, n_layers):
        ko = Knockout("image", ("eoi", "text"), layers=layers, mode=cfg.get("mode") or "zero")
        out.append(Condition(ko.name, knockouts=(ko,)))
    return out


class Overlap(Experiment):
    name = "overlap"
    task = "classes"
    prompts = ("class",)
    defaults = {"k": 30, "image_index": 31, "n_per_class": 100}

    def check(self, examples, cfg):
        check_k((e.label for e in examples), cfg["k"])

    def process(self, vlm, units, images, cfg):
        batch = vlm.prepare([im[0] for im in images], [class_prompt(cfg)] * len(units))
        k = image_index(batch, cfg["image_index"])
        roles = ROLES + tuple(r for r in OPTIONAL_ROLES if all(len(p) for p in batch.positions(r)))
        first = 1 if cfg.get("outputs_only") else 0
        capture = Capture(roles + (f"image[{k}]",), layers=tuple(range(first, vlm.n_layers + 1)))
        conds = conditions(cfg, vlm.n_layers)
        outs = vlm.forward_conditions(batch, conds, capture=capture)
        rows = [{"example_id": u.id, "label": u.examples[0].label, "image_index": k} for u in units]
        arrays = {}
        for i, cond in enumerate(conds):
            res = outs[cond.name].residuals
            for role in roles:
                arrays[f"{i}:{role}"] = res[role].numpy().astype(np.float16)
            arrays[f"{i}:image_k"] = res[f"image[{k}]"].numpy().astype(np.float16)
        return rows, arrays

    def aggregate(self, records, cfg, info):
        labels = records.rows["label"].to_numpy()
        k_used = int(records.rows["image_index"].min())
        k = overlap_k(labels, cfg["k"])
        first = 1 if cfg.get("outputs_only") else 0
        rows = []
        for i, cond in enumerate(conditions(cfg, info["n_layers"])):
            layers = [int(l) for l in cond.knockouts[0].layers] if cond.knockouts else []
            window = "" if not layers else "0" if len(layers) == 1 else f"0-{layers[-1]}"
            for role in (*ROLES, *OPTIONAL_ROLES, "image_k"):
                if f"{i}:{role}" not in records.arrays:
                    continue
                values = neighborhood_overlap_per_layer(stack(records.arrays, f"{i}:{role}").transpose(1, 0, 2),
                                                        labels, k=k)
                name = f"image[{k_used}]" if role == "image_k" else role
                rows += [{"knockout": cond.name, "knockout_layers": window, "resid": first + j, "role": name,
                          "overlap": float(v), "k": k} for j, v in enumerate(values)]
        return {"overlap": pd.DataFrame(rows)}
