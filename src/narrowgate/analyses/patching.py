"""Sec. 4.4, Eq. 3: steer what the model says about an image by patching [EOI] from another class.

Images are sampled per pair class (``n_per_class``, the paper's 100; ``--n`` does not apply): the
paper's 10 ImageNet pairs, or consecutive synthetic shapes. The i-th image of a pair's base class is
paired with the i-th image of its target class. Direction: the paper patches base <- target; the
authors' code takes the first class of each printed pair as the donor (target) and the second as
the base, and so does the default ``direction="paper"``; ``"both"`` adds the reverse direction.

Per unit the target image runs once unpatched (its [EOI] residual at every index and its
next-token distribution), then the base image runs unpatched and patched. ``span="single"`` (the
paper's Fig. 5) patches the residual entering one decoder layer ``l`` (later layers see it through
the residual stream); ``span="from"`` (the authors' second variant) patches [EOI] at every index
``l..L-1``. Per patch site: the similarity (Eq. 3, histogram intersection) of the patched and the
target's next-token distributions, whether the target class scores higher than the base class
(``accuracy``), and the authors' criterion, the *flip rate*: the share of examples whose sign of
score(target) - score(base) differs between the unpatched and the patched run (a name-length prior that
favours one class unpatched moves ``accuracy`` but not the flip rate). A class is scored by its whole
name: the teacher-forced, summed log-probability of every token of " <name>" after the prompt (the
authors compared hand-picked first-token ids per model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..data.prompts import class_prompt, name_ids, name_scores
from ..engine.interventions import Capture, Patch
from ..engine.shared import Condition
from ..metrics import distribution_similarity
from .base import PairedExperiment, Unit, pair_order, register
from .options import DIRECTIONS, SPANS, PairsConfig, option

if TYPE_CHECKING:
    from ..store import RunStore, Shard
    from ..vlm import VLM

__all__ = ["DIRECTIONS", "SPANS", "PairsConfig", "Patching", "PatchingConfig", "pair_order", "patch_conditions"]


def patch_conditions(donor: torch.Tensor, n_layers: int, span: str) -> list[Condition]:
    """Baseline plus one condition per residual index ``l`` (patch at ``l``, or at every index ``l..L-1``)."""
    conds = [Condition("baseline")]
    for l in range(n_layers):
        sites = (l,) if span == "single" else tuple(range(l, n_layers))
        conds.append(Condition(f"patch@{l}", patches=tuple(Patch("eoi", j, donor[:, j]) for j in sites)))
    return conds


@dataclass
class PatchingConfig(PairsConfig):
    """Settings of ``narrowgate run patching``."""

    span: str = option(
        "single", "single (patch resid l, Fig. 5) or from (resid l..L-1, the authors' 2nd variant).", choices=SPANS
    )


@register
class Patching(PairedExperiment[PatchingConfig]):
    """Steer the next-token distribution by patching [EOI] from another class (Sec. 4.4, Fig. 5)."""

    name = "patching"
    config = PatchingConfig
    curve = ("patching", "similarity", None)

    def process(
        self, vlm: VLM, units: list[Unit], images: list[tuple], cfg: PatchingConfig
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per pair, the similarity to the target's distribution and the class scores, unpatched and patched at
        every residual index."""
        prompt = class_prompt(cfg.prompt, cfg.data)
        tok = vlm.family.tokenizer
        L = vlm.n_layers
        base_batch = vlm.prepare([im[0] for im in images], [prompt] * len(units))
        target_batch = vlm.prepare([im[1] for im in images], [prompt] * len(units))
        target = vlm.forward_conditions(target_batch, [Condition("baseline")], capture=Capture("eoi"))["baseline"]
        p_target = torch.softmax(target.last_logits, -1)
        conds = patch_conditions(target.residuals["eoi"], L, cfg.span)
        base_names = [name_ids(tok, u.examples[0].word) for u in units]
        target_names = [name_ids(tok, u.examples[1].word) for u in units]
        s_base, first = name_scores(vlm, base_batch, conds, base_names)
        s_target, _ = name_scores(vlm, base_batch, conds, target_names)
        names = [c.name for c in conds]
        sim = np.stack([distribution_similarity(torch.softmax(first[c], -1), p_target).numpy() for c in names], 1)
        acc = np.stack([(s_target[c] > s_base[c]).numpy() for c in names], 1).astype(np.float32)
        rows = [
            {
                "example_id": u.id,
                "pair": f"{u.examples[0].label}<-{u.examples[1].label}",
                "base": u.examples[0].label,
                "target": u.examples[1].label,
                "base_word": u.examples[0].word,
                "target_word": u.examples[1].word,
                "base_image": u.examples[0].id,
                "target_image": u.examples[1].id,
            }
            for u in units
        ]
        return rows, {
            "similarity": sim[:, 1:].astype(np.float32),
            "accuracy": acc[:, 1:],
            "similarity_unpatched": sim[:, 0].astype(np.float32),
            "accuracy_unpatched": acc[:, 0],
            "score_base": np.stack([s_base[c].numpy() for c in names[1:]], 1).astype(np.float32),
            "score_target": np.stack([s_target[c].numpy() for c in names[1:]], 1).astype(np.float32),
            "score_base_unpatched": s_base[names[0]].numpy().astype(np.float32),
            "score_target_unpatched": s_target[names[0]].numpy().astype(np.float32),
        }

    def aggregate(self, records: Shard, cfg: PatchingConfig, info: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """Tables ``patching`` (per residual index: similarity, accuracy, flip rate) and ``patching_pairs``."""
        L = info["n_layers"]
        sim = records.arrays["similarity"].reshape(-1, L)
        acc = records.arrays["accuracy"].reshape(-1, L)
        base_sim = records.arrays["similarity_unpatched"].reshape(-1)
        base_acc = records.arrays["accuracy_unpatched"].reshape(-1)
        flips = flip_matrix(records.arrays, L)
        site = "eoi, resid l" if cfg.span == "single" else "eoi, resid l..L-1"
        rows = [
            {
                "resid": l,
                "relative_depth": l / max(1, L),
                "patched": site,
                "direction": cfg.direction,
                "similarity": float(sim[:, l].mean()),
                "similarity_std": float(sim[:, l].std()),
                "accuracy": float(acc[:, l].mean()),
                "flip_rate": float(flips[:, l].mean()),
                "similarity_unpatched": float(base_sim.mean()),
                "accuracy_unpatched": float(base_acc.mean()),
                "n": int(sim.shape[0]),
            }
            for l in range(L)
        ]
        pairs = records.rows["pair"].to_numpy()
        first = records.rows.drop_duplicates("pair").set_index("pair")
        per_pair = []
        for p in first.index:
            m = pairs == p
            curve = sim[m].mean(0)
            per_pair.append(
                {
                    "pair": p,
                    "base": first.loc[p, "base_word"],
                    "target": first.loc[p, "target_word"],
                    "best_resid": int(curve.argmax()),
                    "max_similarity": float(curve.max()),
                    "max_accuracy": float(acc[m].mean(0).max()),
                    "max_flip_rate": float(flips[m].mean(0).max()),
                    "similarity_unpatched": float(base_sim[m].mean()),
                    "accuracy_unpatched": float(base_acc[m].mean()),
                    "n": int(m.sum()),
                }
            )
        return {"patching": pd.DataFrame(rows), "patching_pairs": pd.DataFrame(per_pair)}

    def figures(
        self, tables: dict[str, pd.DataFrame], info: dict[str, Any], store: RunStore, cfg: PatchingConfig
    ) -> list[str]:
        """Fig. 5: similarity to the target distribution and p(target) > p(base) per patched residual index."""
        from ..plots import COLORS, has, plt, save

        if not has(tables, "patching"):
            return []
        df = tables["patching"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        a.plot(df["relative_depth"], df["similarity"], "-o", ms=3, color=COLORS[2], label="after patching")
        a.axhline(df["similarity_unpatched"].iloc[0], ls="--", color=COLORS[0], label="without patching")
        a.set(
            xlabel="relative depth of the patched residual (resid / L)",
            ylabel="similarity to target distribution",
            ylim=(0, 1),
        )
        a.legend(fontsize=8)
        b.plot(df["relative_depth"], df["accuracy"], "-o", ms=3, color=COLORS[1], label="score(target) > score(base)")
        b.axhline(df["accuracy_unpatched"].iloc[0], ls="--", color=COLORS[0], label="... without patching")
        if df["flip_rate"].notna().any():
            b.plot(df["relative_depth"], df["flip_rate"], "-s", ms=3, color=COLORS[3], label="flip rate (authors')")
        b.set(
            xlabel="relative depth of the patched residual (resid / L)", ylabel="share of examples", ylim=(-0.02, 1.02)
        )
        b.legend(fontsize=8)
        return [save(fig, store, "patching")]


def flip_matrix(arrays: dict, n_layers: int) -> np.ndarray:
    """[examples, L]: whether the sign of score(target) - score(base) differs between the unpatched run and the run
    patched at each residual index (the authors' criterion); NaN for records made before it was stored."""
    if "score_target_unpatched" not in arrays:
        n = len(arrays["similarity"])
        return np.full((n, n_layers), np.nan)
    before = np.sign(arrays["score_target_unpatched"].reshape(-1, 1) - arrays["score_base_unpatched"].reshape(-1, 1))
    after = np.sign(arrays["score_target"].reshape(-1, n_layers) - arrays["score_base"].reshape(-1, n_layers))
    return (after != before).astype(np.float64)
