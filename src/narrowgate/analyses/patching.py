"""Sec. 4.4, Eq. 3: steer what the model says about an image by patching [EOI] from another class.

For each class pair (A, B) the i-th image of A is paired with the i-th image of B. Both run
once unpatched (their [EOI] residuals at every layer and their next-token distributions come
from these baselines); then each is patched, one layer at a time, with the other's [EOI]
residual entering that layer (the paper's "one layer at a time"; later layers see it through the
residual stream). Per layer: the similarity (Eq. 3, histogram intersection) between the patched
and the target image's next-token distribution, and whether p(target word) > p(base word), the
word token being the first token of " <word>".
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..data import by_label
from ..engine.interventions import Capture, Patch
from ..engine.shared import Condition
from ..metrics import distribution_similarity
from . import tasks
from .base import Experiment, Unit
from .prompts import class_prompt, word_token


class Patching(Experiment):
    name = "patching"
    task = "classes"
    defaults = {"n_per_class": 100}

    def units(self, examples, cfg):
        groups = {k: sorted(v, key=lambda e: e.id) for k, v in by_label(examples).items()}
        units = []
        for a, b in tasks.class_pairs(cfg["data"]):
            if a not in groups or b not in groups:
                raise tasks.DataError(f"Class pair ({a}, {b}) is not in the data: each pair needs both classes.")
            for i, (ea, eb) in enumerate(zip(groups[a], groups[b])):
                units.append(Unit(f"{a}|{b}|{i:04d}", (ea, eb)))
        return units

    def process(self, vlm, units, images, cfg):
        prompt = class_prompt(cfg)
        tok = vlm.family.tokenizer
        sides = []
        for side in (0, 1):
            batch = vlm.prepare([im[side] for im in images], [prompt] * len(units))
            base = vlm.forward_conditions(batch, {"baseline": {}}, capture=Capture("eoi"))["baseline"]
            sides.append((batch, base))
        sim = np.zeros((len(units), 2, vlm.n_layers), np.float32)
        acc = np.zeros_like(sim)
        sim_base = np.zeros((len(units), 2), np.float32)
        acc_base = np.zeros_like(sim_base)
        for side in (0, 1):
            batch, base = sides[side]
            target_batch, target = sides[1 - side]
            donor = target.residuals["eoi"]
            conds = [Condition(f"patch@{l}", patches=(Patch("eoi", l, donor[:, l]),)) for l in range(vlm.n_layers)]
            outs = vlm.forward_conditions(batch, conds)
            p_target = torch.softmax(target.last_logits, -1)
            p_base = torch.softmax(base.last_logits, -1)
            w_base = torch.tensor([word_token(tok, u.examples[side].word) for u in units])
            w_target = torch.tensor([word_token(tok, u.examples[1 - side].word) for u in units])
            rows = torch.arange(len(units))
            sim_base[:, side] = distribution_similarity(p_base, p_target).numpy()
            acc_base[:, side] = (p_base[rows, w_target] > p_base[rows, w_base]).numpy()
            for l in range(vlm.n_layers):
                p = torch.softmax(outs[f"patch@{l}"].last_logits, -1)
                sim[:, side, l] = distribution_similarity(p, p_target).numpy()
                acc[:, side, l] = (p[rows, w_target] > p[rows, w_base]).numpy()
        rows_out = [{"example_id": u.id, "pair": "|".join(u.id.split("|")[:2]),
                     "base_a": u.examples[0].id, "base_b": u.examples[1].id} for u in units]
        return rows_out, {"similarity": sim, "accuracy": acc, "similarity_unpatched": sim_base,
                          "accuracy_unpatched": acc_base}

    def aggregate(self, records, cfg, info):
        L = info["n_layers"]
        sim = records.arrays["similarity"].reshape(-1, L)
        acc = records.arrays["accuracy"].reshape(-1, L)
        base_sim = records.arrays["similarity_unpatched"].reshape(-1)
        base_acc = records.arrays["accuracy_unpatched"].reshape(-1)
        rows = [
            {"layer": l, "relative_depth": l / max(1, L - 1), "similarity": float(sim[:, l].mean()),
             "similarity_std": float(sim[:, l].std()), "accuracy": float(acc[:, l].mean()),
             "similarity_unpatched": float(base_sim.mean()), "accuracy_unpatched": float(base_acc.mean()),
             "n": int(sim.shape[0])}
            for l in range(L)
        ]
        pairs = records.rows["pair"].to_numpy().repeat(2)
        per_pair = [
            {"pair": p, "best_layer": int(sim[pairs == p].mean(0).argmax()),
             "max_similarity": float(sim[pairs == p].mean(0).max()), "max_accuracy": float(acc[pairs == p].mean(0).max())}
            for p in sorted(set(pairs))
        ]
        return {"patching": pd.DataFrame(rows), "patching_pairs": pd.DataFrame(per_pair)}
