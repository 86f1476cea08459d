"""Two images, one question about one of them: does the answer flow through that image's [EOI]?

Each unit is two images of different classes in one prompt, and a question about one of them, alternately the
first and the second (``--question``, default "The shape in the {which} image is a" on synthetic data, "The animal
in the {which} image is a" on ImageNet). The answer is scored by whole class names, as in patching: the
teacher-forced, summed log-probability of " <name>" of the asked image's class and of the other image's class; their
difference is the *margin* (above 0: the model prefers the asked image's class).

Conditions, in one batch (`VLM.forward_conditions`):

- the asked image's [EOI] -> text and the other image's, knocked out at every layer (``--mode``, ``zero`` the
  paper's); the asked image's span -> text and the other's (the direct path, its [EOI] kept);
- the two [EOI]s swapped: at residual index l, ``eoi@1`` gets image 2's [EOI] residual and ``eoi@2`` image 1's
  (from the unpatched run); ``--span from`` swaps at every index l..L-1. If each [EOI] carries its own image, the
  answer follows the swap: it names the other image's class.

Per condition: the share of units preferring the asked image's class (``accuracy``), the mean margin and its change
from the baseline, the *flip rate* (the sign of the margin changed, as patching's authors' criterion) and
KL(baseline || condition) of the answer's first token. ``summary`` says how much of the margin each knockout removes
and how often the swap flips the answer — and gives no verdict when the baseline does not prefer the asked image
above chance (0.5: the model does not answer the question as asked; the KL and flip columns stay, they describe the
model's own computation whatever it answers).

Several images share no prefix once an intervention touches the first one's [EOI] (the suffix may hold no image
token): the swap conditions run as full forwards, one per residual index, twice (both names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from ..data import ClassExample, by_label
from ..data.prompts import name_ids, name_scores
from ..engine.interventions import Capture, Knockout, Patch
from ..engine.shared import Condition
from ..errors import OptionError
from ..metrics.scores import kl
from .base import Experiment, Sample, Unit, register
from .options import MODES, SPANS, RunConfig, option

if TYPE_CHECKING:
    import torch

    from ..store import RunStore, Shard
    from ..vlm import VLM

WHICH = {1: "first", 2: "second"}
QUESTIONS = {"synthetic": "The shape in the {which} image is a", "imagenet": "The animal in the {which} image is a"}
#: The knockout conditions, per image number, named for the image asked about ("asked") and the other one.
KNOCKOUTS = ("eoi", "image")
CHANCE = 0.5
MIN_UNITS = 10


@dataclass
class TwoImagesConfig(RunConfig):
    """Settings of ``narrowgate run two-images``."""

    n_per_class: int | None = option(20, "Images per class (pairs are made across classes).", min=1)
    question: str | None = option(
        None,
        "The question, with {which} for 'first' / 'second' (default: 'The shape in the {which} image is a', "
        "'The animal in the {which} image is a' on ImageNet).",
        parse="nonempty",
    )
    mode: str = option("zero", "Knockout mode: zero (the paper's) or mask (exactly blind).", choices=MODES)
    span: str = option("single", "Swap the [EOI]s at resid l (single) or at every resid l..L-1 (from).", choices=SPANS)


def question(cfg: TwoImagesConfig) -> str:
    """The question template (``--question``, else the dataset's), with ``{which}`` for 'first' / 'second'."""
    return cfg.question or QUESTIONS.get(cfg.data, QUESTIONS["imagenet"])


def conditions(eois: dict[str, torch.Tensor], n_layers: int, mode: str, span: str) -> list[Condition]:
    """Baseline, each image's [EOI] and span -> text, then the [EOI]s swapped at each residual index."""
    conds = [Condition("baseline")]
    for role in KNOCKOUTS:
        for n in (1, 2):
            conds.append(Condition(f"{role}@{n}->text", knockouts=(Knockout(f"{role}@{n}", "text", mode=mode),)))
    one, two = eois["eoi@1"], eois["eoi@2"]
    for l in range(n_layers):
        sites = (l,) if span == "single" else tuple(range(l, n_layers))
        patches = tuple(p for j in sites for p in (Patch("eoi@1", j, two[:, j]), Patch("eoi@2", j, one[:, j])))
        conds.append(Condition(f"swap@{l}", patches=patches))
    return conds


@register
class TwoImages(Experiment[TwoImagesConfig]):
    """Two images, one question about one of them: does the answer flow through that image's [EOI]?"""

    name = "two-images"
    task = "classes"
    config = TwoImagesConfig
    curve = ("swap", "flip_rate", None)

    def check(self, examples: Sample, cfg: TwoImagesConfig) -> None:
        """Refuse a question without ``{which}`` and too few pairs for the rates."""
        if "{which}" not in question(cfg):
            raise OptionError(f"--question {question(cfg)!r} has no {{which}} for 'first' / 'second'.")
        units = len(self.units(examples, cfg))
        if units < MIN_UNITS:
            raise OptionError(
                f"two-images makes {units} pair(s) of images of different classes from {len(examples)} example(s); "
                f"its rates need at least {MIN_UNITS}: raise --n-per-class."
            )

    def units(self, examples: Sample, cfg: TwoImagesConfig) -> list[Unit]:
        """Pairs of images of different classes: classes taken in turn, so neighbours differ; the unit's index
        decides which image the question asks about (even: the first)."""
        groups = [sorted(v, key=lambda e: e.id) for _, v in sorted(by_label(examples).items())]
        order = [g[k] for k in range(max((len(g) for g in groups), default=0)) for g in groups if k < len(g)]
        units: list[Unit] = []
        for a, b in zip(order[::2], order[1::2]):
            if cast(ClassExample, a).label == cast(ClassExample, b).label:
                continue
            n = len(units)
            units.append(Unit(f"{a.id}+{b.id}", (a, b), meta={"asked": 1 + n % 2}))
        return units

    def process(
        self, vlm: VLM, units: list[Unit], images: list[tuple], cfg: TwoImagesConfig
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per pair, the class-name scores of the asked and the other image's class and the first token's KL,
        under every condition."""
        asked = [int(u.meta["asked"]) for u in units]
        prompts = [question(cfg).format(which=WHICH[a]) for a in asked]
        batch = vlm.prepare([list(pair) for pair in images], prompts)
        eois = vlm.forward(batch, capture=Capture(("eoi@1", "eoi@2"))).residuals
        conds = conditions(eois, vlm.n_layers, cfg.mode, cfg.span)
        tok = vlm.family.tokenizer
        mine = [name_ids(tok, u.examples[a - 1].word) for u, a in zip(units, asked)]
        other = [name_ids(tok, u.examples[2 - a].word) for u, a in zip(units, asked)]
        s_asked, first = name_scores(vlm, batch, conds, mine)
        s_other, _ = name_scores(vlm, batch, conds, other)
        names = [c.name for c in conds]
        base = first["baseline"].float()
        rows = [
            {
                "example_id": u.id,
                "asked": a,
                "asked_label": u.examples[a - 1].label,
                "other_label": u.examples[2 - a].label,
                "first_image": u.examples[0].id,
                "second_image": u.examples[1].id,
            }
            for u, a in zip(units, asked)
        ]
        return rows, {
            "score_asked": np.stack([s_asked[c].numpy() for c in names], 1).astype(np.float32),
            "score_other": np.stack([s_other[c].numpy() for c in names], 1).astype(np.float32),
            "kl": np.stack([kl(base, first[c].float()).numpy() for c in names], 1).astype(np.float32),
        }

    def aggregate(self, records: Shard, cfg: TwoImagesConfig, info: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """Tables ``two_images`` (per knockout), ``swap`` (per residual index) and ``summary`` (the verdict)."""
        L = info["n_layers"]
        C = 1 + 2 * len(KNOCKOUTS) + L
        margin = (records.arrays["score_asked"] - records.arrays["score_other"]).reshape(-1, C).astype(np.float64)
        div = records.arrays["kl"].reshape(-1, C).astype(np.float64)
        asked = records.rows["asked"].to_numpy()
        flips = np.sign(margin) * np.sign(margin[:, :1]) < 0  # the preference reversed (a tie is no flip)

        def column(role: str, which: str) -> np.ndarray:
            """Per unit, the column of ``role``'s knockout on the asked (or the other) image."""
            n = asked if which == "asked" else 3 - asked
            first = 1 + 2 * KNOCKOUTS.index(role)
            return first + (n - 1)

        rows = [_row("baseline", margin[:, 0], margin[:, 0], div[:, 0], flips[:, 0])]
        idx = np.arange(len(margin))
        for role in KNOCKOUTS:
            for which in ("asked", "other"):
                c = column(role, which)
                label = f"{role} of the {which} image -> text"
                rows.append(_row(label, margin[idx, c], margin[:, 0], div[idx, c], flips[idx, c]))
        knockouts = pd.DataFrame(rows)
        swaps = []
        for l in range(L):
            col = 1 + 2 * len(KNOCKOUTS) + l
            row = _row(f"swap@{l}", margin[:, col], margin[:, 0], div[:, col], flips[:, col])
            swaps.append({"resid": l, "relative_depth": l / max(1, L), "span": cfg.span, **row})
        swap = pd.DataFrame(swaps).drop(columns="condition")
        return {"two_images": knockouts, "swap": swap, "summary": pd.DataFrame([_summary(knockouts, swap, cfg)])}

    def figures(
        self, tables: dict[str, pd.DataFrame], info: dict[str, Any], store: RunStore, cfg: TwoImagesConfig
    ) -> list[str]:
        """Margin change per knockout, and the swap's flip rate per residual index."""
        from ..plots import COLORS, has, plt, save

        if not has(tables, "two_images"):
            return []
        df, swap = tables["two_images"].iloc[1:], tables["swap"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 1.2]})
        a.barh(range(len(df)), df["margin_change"], color=[COLORS[1], COLORS[0]] * (len(df) // 2))
        a.set_yticks(range(len(df)), df["condition"], fontsize=8)
        a.invert_yaxis()
        a.axvline(0, color="k", lw=0.8)
        a.set(xlabel="change of margin: log p(asked class) - log p(other class)", title="knockouts")
        b.plot(swap["relative_depth"], swap["flip_rate"], "-o", ms=3, color=COLORS[2], label="answer flipped")
        b.plot(swap["relative_depth"], swap["accuracy"], "-s", ms=3, color=COLORS[3], label="prefers asked image")
        b.axhline(float(tables["two_images"]["accuracy"].iloc[0]), ls="--", color=COLORS[0], label="unswapped")
        b.set(xlabel="relative depth of the swap (resid / L)", ylabel="share of pairs", ylim=(-0.02, 1.02))
        b.set_title("[EOI]s swapped", fontsize=10)
        b.legend(fontsize=8)
        return [save(fig, store, "two_images")]


def _row(condition: str, margin: np.ndarray, base: np.ndarray, div: np.ndarray, flips: np.ndarray) -> dict:
    n = len(margin)
    acc = float((margin > 0).mean())
    return {
        "condition": condition,
        "accuracy": acc,
        "accuracy_se": math.sqrt(acc * (1 - acc) / n) if n else float("nan"),
        "margin": float(margin.mean()),
        "margin_change": float((margin - base).mean()),
        "flip_rate": float(flips.mean()),
        "kl": float(div.mean()),
        "n": n,
    }


def _summary(knockouts: pd.DataFrame, swap: pd.DataFrame, cfg: TwoImagesConfig) -> dict:
    """The share of the baseline margin each knockout removes, the swap's largest flip rate, and the verdict."""
    by = knockouts.set_index("condition")
    base = by.loc["baseline"]
    best = swap.loc[swap["flip_rate"].idxmax()]
    out = {
        "mode": cfg.mode,
        "n": int(base["n"]),
        "baseline_accuracy": float(base["accuracy"]),
        "chance": CHANCE,
        "baseline_margin": float(base["margin"]),
        "swap_best_resid": int(best["resid"]),
        "swap_flip_rate": float(best["flip_rate"]),
    }
    # Above chance by two standard errors (one-sided, ~98%): a preference a few pairs show by luck gives no shares.
    low = float(base["accuracy"] - 2 * base["accuracy_se"])
    above = low > CHANCE and base["margin"] > 0
    for role in KNOCKOUTS:
        for which in ("asked", "other"):
            change = by.loc[f"{role} of the {which} image -> text", "margin_change"]
            out[f"{role}_{which}_margin_removed"] = float(-change / base["margin"]) if above else float("nan")
    if not above:
        out["verdict"] = (
            f"no verdict: the baseline prefers the asked image's class in {base['accuracy']:.2f} of {int(base['n'])} "
            f"pairs (standard error {base['accuracy_se']:.2f}; chance {CHANCE}; mean margin {base['margin']:.3g}), not "
            "clearly above chance (by two standard errors), so it is not shown to answer the question as asked; the "
            f"swap flips {best['flip_rate']:.2f} of answers at resid {int(best['resid'])}."
        )
    else:
        out["verdict"] = (
            f"knocking out the asked image's [EOI] removes {out['eoi_asked_margin_removed']:.0%} of the margin (the "
            f"other image's: {out['eoi_other_margin_removed']:.0%}; the asked image's span: "
            f"{out['image_asked_margin_removed']:.0%}); swapping the [EOI]s flips {best['flip_rate']:.0%} of the "
            f"answers at resid {int(best['resid'])} ({cfg.mode} mode, {int(base['n'])} pairs)."
        )
    return out
