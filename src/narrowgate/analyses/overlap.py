"""Sec. 4.2, Eq. 2: how much ImageNet class information the residual stream holds at each role, per layer.

Residuals are captured at ``eoi``, ``last_image``, ``image[k]`` (the paper's 32nd image token,
k = 31, or the last but one when the image is shorter), the mean over ``internal_image``
tokens, and ``last``; the neighbourhood overlap with the class labels (k = 30) is computed per
residual index ``resid`` 0..L (0 = embeddings; the paper plots layer outputs, resid 1..L) over all
examples. The authors' "32nd image token" is sequence position 32, content index 30: ``--image-index 30``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..engine.interventions import Capture
from ..metrics import neighborhood_overlap_per_layer
from .base import Experiment, check_k, overlap_k, stack
from .prompts import class_prompt

ROLES = ("eoi", "last_image", "internal_image", "last")


def image_index(batch, wanted: int) -> int:
    """``wanted`` if every example has that many content tokens, else the last but one."""
    shortest = min(len(lay.content) for lay in batch.layouts)
    return min(wanted, shortest - 2)


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
        out = vlm.forward_conditions(batch, {"baseline": {}}, capture=Capture(ROLES + (f"image[{k}]",)))["baseline"]
        rows = [{"example_id": u.id, "label": u.examples[0].label, "image_index": k} for u in units]
        arrays = {role: out.residuals[role].numpy().astype(np.float16) for role in ROLES}
        arrays["image_k"] = out.residuals[f"image[{k}]"].numpy().astype(np.float16)
        return rows, arrays

    def aggregate(self, records, cfg, info):
        labels = records.rows["label"].to_numpy()
        k_used = int(records.rows["image_index"].min())
        k = overlap_k(labels, cfg["k"])
        rows = []
        for role in ROLES + ("image_k",):
            values = neighborhood_overlap_per_layer(stack(records.arrays, role).transpose(1, 0, 2), labels, k=k)
            name = f"image[{k_used}]" if role == "image_k" else role
            rows += [{"resid": l, "role": name, "overlap": float(v), "k": k} for l, v in enumerate(values)]
        return {"overlap": pd.DataFrame(rows)}
