"""Sec. 4.4: edit [EOI] to change what the model *says* about an image (generated text, not only logits).

Pairs and images as in `patching` (base <- target, ``--direction``, ``--n-per-class``). Each base image
generates a completion of the class prompt twice: unpatched, and with the target image's [EOI]
residual patched in at every residual index of a window (``--layers``, default the paper's effective
range, relative depth 0.25-0.5). Reported: how often the text names the target class and the base
class (whole name, case-insensitive), with and without the edit, and example texts.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..engine.interventions import Capture, Patch
from ..engine.shared import Condition
from .ablation import parse_layers
from .base import register
from .options import option
from .patching import PairsConfig, Patching
from .prompts import class_prompt


@dataclass
class SteeringConfig(PairsConfig):
    resids: str | None = option(
        None, "Residual indices patched, e.g. 8-16 (default: relative depth 0.25-0.5).", parse="layers"
    )
    max_new_tokens: int = option(10, "New tokens of each completion.", min=1)


def window(cfg: dict, n_layers: int) -> tuple[int, ...]:
    """The patched residual indices: ``--resids`` or relative depth 0.25-0.5."""
    given = parse_layers(cfg.get("resids"), n_layers + 1, option="--resids")
    if given is not None:
        return given
    lo, hi = round(0.25 * (n_layers - 1)), round(0.5 * (n_layers - 1))
    return tuple(range(lo, hi + 1))


def names(text: str, word: str) -> bool:
    return word.lower() in text.lower()


@register
class Steering(Patching):
    name = "steering"
    config = SteeringConfig
    curve = None

    def check_model(self, cfg, n_layers):
        window(cfg, n_layers)

    def process(self, vlm, units, images, cfg):
        prompt = class_prompt(cfg)
        base = vlm.prepare([im[0] for im in images], [prompt] * len(units))
        target = vlm.prepare([im[1] for im in images], [prompt] * len(units))
        donor = vlm.forward_conditions(target, {"baseline": {}}, capture=Capture("eoi"))["baseline"].residuals["eoi"]
        sites = window(cfg, vlm.n_layers)
        conds = [
            Condition("baseline"),
            Condition("steered", patches=tuple(Patch("eoi", l, donor[:, l]) for l in sites)),
        ]
        gens = vlm.generate_conditions(base, conds, max_new_tokens=int(cfg["max_new_tokens"]))
        texts = {c.name: [t.strip() for t in vlm.decode(gens[c.name], base)] for c in conds}
        rows = []
        for b, u in enumerate(units):
            eb, et = u.examples
            rows.append(
                {
                    "example_id": u.id,
                    "pair": f"{eb.label}<-{et.label}",
                    "base": eb.word,
                    "target": et.word,
                    "resids": f"{sites[0]}-{sites[-1]}",
                    "text_unpatched": texts["baseline"][b],
                    "text_steered": texts["steered"][b],
                }
            )
        return rows, {}

    def figures(self, tables, info, store):
        return []

    def aggregate(self, records, cfg, info):
        df = records.rows
        flags = pd.DataFrame(
            {
                "pair": df["pair"],
                "target_unpatched": [names(t, w) for t, w in zip(df["text_unpatched"], df["target"])],
                "target_steered": [names(t, w) for t, w in zip(df["text_steered"], df["target"])],
                "base_unpatched": [names(t, w) for t, w in zip(df["text_unpatched"], df["base"])],
                "base_steered": [names(t, w) for t, w in zip(df["text_steered"], df["base"])],
            }
        )
        per_pair = flags.groupby("pair", sort=False).mean().reset_index()
        per_pair = df.drop_duplicates("pair")[["pair", "base", "target"]].merge(per_pair, on="pair")
        per_pair["n"] = df.groupby("pair", sort=False).size().to_numpy()
        total = flags.drop(columns="pair").mean().to_dict()
        summary = pd.DataFrame(
            [
                {
                    "resids": df["resids"].iloc[0],
                    "direction": cfg["direction"],
                    **{f"names_{k}": float(v) for k, v in total.items()},
                    "n": len(df),
                }
            ]
        )
        examples = df.groupby("pair", sort=False).head(2)[["pair", "base", "target", "text_unpatched", "text_steered"]]
        return {"steering": summary, "steering_pairs": per_pair, "steering_examples": examples.reset_index(drop=True)}
