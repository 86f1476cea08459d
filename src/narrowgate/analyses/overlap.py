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

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..engine.interventions import Capture, Knockout
from ..engine.shared import Condition
from ..metrics import neighborhood_overlap_per_layer
from .base import Experiment, check_k, check_sweep, overlap_k, register, stack, sweep_step
from .options import MODES, ClassPrompt, RunConfig, option
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
    step = sweep_step(cfg, n_layers)
    ends = list(range(step, n_layers + 1, step))
    if not ends or ends[-1] != n_layers:
        ends.append(n_layers)
    return [tuple(range(w)) for w in ends]


def conditions(cfg: dict, n_layers: int) -> list[Condition]:
    """The baseline plus ``image -> eoi+text`` knocked out in each window of `windows`."""
    out = [Condition(NO_KNOCKOUT)]
    for layers in windows(cfg, n_layers):
        ko = Knockout("image", ("eoi", "text"), layers=layers, mode=cfg["mode"])
        out.append(Condition(ko.name, knockouts=(ko,)))
    return out


@dataclass
class OverlapConfig(ClassPrompt, RunConfig):
    n_per_class: int | None = option(100, "Images per class (the paper: 100).", min=1)
    k: int = option(30, "Neighbours of the neighbourhood overlap (the paper: 30).", min=1)
    image_index: int = option(31, "The k of image[k], the paper's 32nd image token (the authors' code: 30).", min=0)
    outputs_only: bool = option(False, "Layer outputs only (resid 1..L, the paper's x axis), not the embeddings.")
    sweep: bool = option(
        False,
        "Also under growing early-layer windows 0..w-1 of image->eoi+text knocked out "
        "(the authors' overlap-with-ablation).",
    )
    sweep_step: int = option(1, "Window growth per step with --sweep.", min=1)
    mode: str = option("zero", "Knockout mode of --sweep: zero (the paper's) or mask.", choices=MODES)


@register
class Overlap(Experiment):
    name = "overlap"
    task = "classes"
    prompts = ("class",)
    config = OverlapConfig
    curve = ("overlap", "overlap", None)

    def check(self, examples, cfg):
        check_sweep(cfg)
        check_k((e.label for e in examples), cfg["k"])

    def check_model(self, cfg, n_layers):
        windows(cfg, n_layers)

    def process(self, vlm, units, images, cfg):
        batch = vlm.prepare([im[0] for im in images], [class_prompt(cfg)] * len(units))
        k = image_index(batch, cfg["image_index"])
        roles = ROLES + tuple(r for r in OPTIONAL_ROLES if all(len(p) for p in batch.positions(r)))
        first = 1 if cfg.get("outputs_only") else 0
        capture = Capture(roles + (f"image[{k}]",), resids=tuple(range(first, vlm.n_layers + 1)))
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
                values = neighborhood_overlap_per_layer(
                    stack(records.arrays, f"{i}:{role}").transpose(1, 0, 2), labels, k=k
                )
                name = f"image[{k_used}]" if role == "image_k" else role
                rows += [
                    {
                        "knockout": cond.name,
                        "knockout_layers": window,
                        "resid": first + j,
                        "role": name,
                        "overlap": float(v),
                        "k": k,
                    }
                    for j, v in enumerate(values)
                ]
        return {"overlap": pd.DataFrame(rows)}

    def compare(self, runs):
        """[EOI]'s class information, one line per run (every role of each run is in its own figure)."""
        from ..plots import overlay_curves

        return overlay_curves(
            runs,
            "overlap",
            "overlap",
            None,
            "neighbourhood overlap at [EOI]",
            rows=lambda df: _unablated(df)[lambda d: d["role"] == "eoi"],
        )

    def figures(self, tables, info, store):
        """Overlap per role; with knockout windows, a second panel: [EOI]'s overlap under each window."""
        from ..plots import COLORS, RESID, has, plt, save

        if not has(tables, "overlap"):
            return []
        df = tables["overlap"]
        windows = df[df["knockout"] != NO_KNOCKOUT]
        fig, axes = plt.subplots(1, 2 if len(windows) else 1, figsize=(12 if len(windows) else 7, 3.8), squeeze=False)
        ax = axes[0, 0]
        for i, (role, g) in enumerate(_unablated(df).groupby("role", sort=False)):
            ax.plot(g["resid"], g["overlap"], "-o", ms=3, color=COLORS[i % len(COLORS)], label=role)
        ax.set(xlabel=RESID, ylabel="neighbourhood overlap with labels", ylim=(-0.02, 1.02), title="Class information")
        ax.legend(fontsize=8)
        if len(windows):
            b = axes[0, 1]
            groups = list(df[df["role"] == "eoi"].groupby("knockout", sort=False))
            cmap = plt.get_cmap("viridis")
            for i, (name, g) in enumerate(groups):
                window = str(g["knockout_layers"].iloc[0])
                label = (
                    "no knockout" if name == NO_KNOCKOUT else f"image→eoi+text, layer{'s' * ('-' in window)} {window}"
                )
                color = "k" if name == NO_KNOCKOUT else cmap(i / max(1, len(groups) - 1))
                b.plot(g["resid"], g["overlap"], "-", lw=1.2, color=color, label=label)
            b.set(
                xlabel=RESID, ylabel="overlap at [EOI]", ylim=(-0.02, 1.02), title="[EOI] under early-layer knockouts"
            )
            handles, labels = b.get_legend_handles_labels()
            keep = sorted({0, len(labels) - 1} | set(range(0, len(labels), max(1, len(labels) // 8))))
            b.legend([handles[i] for i in keep], [labels[i] for i in keep], fontsize=7)
        for a in axes[0]:
            a.xaxis.get_major_locator().set_params(integer=True)
        return [save(fig, store, "overlap")]


def _unablated(df: pd.DataFrame) -> pd.DataFrame:
    """The rows without a knockout (the table also holds the ``--sweep`` windows)."""
    return df[df["knockout"] == NO_KNOCKOUT]
