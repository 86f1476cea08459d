"""``narrowgate study emergence``: when does a narrow gate emerge without intervention?

The paper sees a gate in models trained natively to generate images and none in models that only read
them, and attributes it to the training objective; it cannot retrain a 7B model to test that. This study
retrains the native organism's recipe (`narrowgate.organisms.native`, unchanged but for the factors and
`STEPS`) over a grid — share of caption -> image generation sequences (`SHARES`; at 1.0 the understanding
tasks stay in as a fixed share `UNDERSTANDING_FLOOR`, so every model can be scored), image length
(`IMAGE_TOKENS`) and depth (`LAYERS`), two seeds at shares 0 and 0.8 — and measures every model with the
experiments themselves, run by the demo's runner (`narrowgate.demo.demo`, `PLAN`): the gate scan in both
knockout modes, the ablation on VQA, captions and classes, and the cross-attention share of [EOI].

The question, the measurement and the verdict rule were registered before the grid ran, in
docs/study-emergence.md; `judge`, `trend` and `verdict` apply that rule to ``results.csv``.

Layout (``OUT`` holds small files only, ``WORK`` the checkpoints)::

    OUT/study.json            the settings; resuming with others is refused
    OUT/commands.txt          every invocation, with its time
    OUT/results.csv           one row per trained and measured model
    OUT/emergence.png         gate index vs generation share (and the ablation and [EOI] attention)
    OUT/verdict.json          the registered rule applied to results.csv
    OUT/summary.md            the verdict and the headline columns, one row per model
    OUT/failures.csv          models whose training or measurement failed in the last run (retried by the next)
    OUT/cards/<model>/        each organism's training card (CARD.md, card.json)
    WORK/<model>/model/       the organism checkpoint
    WORK/<model>/measure/     the measurement runs (a demo directory: report.html, summary.csv, runs)

Resumable: a model with a row in results.csv is not trained or measured again, a trained checkpoint is not
retrained, and an interrupted measurement run resumes where it stopped. Each invocation rebuilds the rows of the
models still under WORK from their run directories (`refresh`), so results.csv always says what the runs say;
deleting one run's directory (e.g. after a change to that experiment) measures that run again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from ..data.prompts import VQA
from ..errors import OptionError
from ..organisms import native
from ..store import DirectoryLock

SHARES = (0.0, 0.2, 0.5, 0.8, 1.0)
IMAGE_TOKENS = (16, 64)
LAYERS = (4, 8)
#: Seeds beyond seed 0, at the extremes of the share (to show the spread between retrainings).
EXTRA_SEEDS = {0.0: (1,), 0.8: (1,)}
#: Share of understanding sequences kept at generation share 1.0 (the model could not be scored otherwise).
UNDERSTANDING_FLOOR = 0.1
#: Main-phase steps: the largest model (64 image tokens, 8 layers) trains in under 10 minutes on 2 CPU cores.
STEPS = 800
#: The shipped native recipe with the study's step count; the factors are set per grid point.
RECIPE = native.NativeConfig(steps=STEPS)

#: (run name, experiment, settings) per model, run by `narrowgate.demo.demo`; the organisms learnt the plain VQA
#: prompt (not Chameleon's preset). The mask-mode scan keeps the demo's name so the demo reports it.
PLAN = (
    ("gate-scan", "gate-scan", dict(mode="mask", n_per_class=5, bootstrap=1000)),
    ("gate-scan-zero", "gate-scan", dict(mode="zero", n_per_class=5, bootstrap=1000)),
    ("ablation-vqa", "ablation", dict(task="vqa", n=240, vqa_prompt=VQA)),
    ("ablation-captions", "ablation", dict(task="captions", n=96, max_new_tokens=24)),
    ("ablation-classes", "ablation", dict(task="classes", n_per_class=40, k=10)),
    ("cross-attention", "cross-attention", dict(n_per_class=24)),
)
SCANS = {"mask": "gate-scan", "zero": "gate-scan-zero"}
#: results.csv columns that count something (written as integers, blank where missing).
INTEGER_COLUMNS = frozenset(
    {"image_tokens", "layers", "seed", "steps", "eoi_attention_share_layer"}
    | {f"{key}_{mode}" for key in ("n", "n_exact") for mode in SCANS}
)
TASKS = ("vqa", "captions", "classes")

# The registered rule (docs/study-emergence.md).
#: A model is analysed when it reads the image: held-out VQA accuracy at least this many times chance.
READS_IMAGE = 2.0
#: A gate: the whole 95% interval of the mask-mode gate index at or above this (one position does at least half
#: of what the whole image side does) and the ablation's verdict is "a narrow gate".
GATE_LEVEL = 0.5
#: Significance of the trend test (one-sided, within-cell permutations).
ALPHA = 0.05
PERMUTATIONS = 10_000
#: A cell (image length x depth) enters the trend statistic with at least this many analysed models.
MIN_CELL = 3

#: Not registered (added after the first results were seen; reported as exploratory, never in the outcome):
#: [EOI]'s own necessity and sufficiency in mask mode, from the scan's position table. [EOI] is named in advance,
#: so these in-sample numbers carry no selection bias; they separate "[EOI] alone carries the image" (sufficiency)
#: from "the text needs [EOI]" (necessity), which the gate index of the top position mixes.
EXPLORATORY = ("eoi_sufficiency_mask", "eoi_necessity_mask")

OUTCOMES = {
    "gate emerges with generation": "the gate index rises with the generation share and at least one model trained "
    "with share >= 0.5 has a narrow gate",
    "generation concentrates, no gate": "the gate index rises with the generation share, but no model has a narrow "
    "gate",
    "no effect of generation": "the gate index does not change with the generation share",
    "reverse": "the gate index falls as the generation share rises",
    "not enough models": "fewer than two cells have enough analysed models for the test",
}


@dataclass(frozen=True)
class Point:
    """One model of the grid: its generation share (the factor), image length, depth and seed."""

    share: float
    image_tokens: int
    layers: int
    seed: int

    @property
    def name(self) -> str:
        """The model's name in the study (its directory, its row)."""
        return f"share{self.share:g}-tokens{self.image_tokens}-layers{self.layers}-seed{self.seed}"

    @property
    def trained_share(self) -> float:
        """The share of generation sequences actually trained on (the factor, less `UNDERSTANDING_FLOOR` at 1.0)."""
        return round(min(self.share, 1.0 - UNDERSTANDING_FLOOR), 6)

    def config(self, recipe: native.NativeConfig) -> native.NativeConfig:
        """``recipe`` with this point's factors."""
        return dataclasses.replace(
            recipe, generation_share=self.trained_share, image_tokens=self.image_tokens, layers=self.layers
        )


#: Shares trained first in every cell, so that a grid stopped early already has a trend to test in each.
FIRST_SHARES = (0.0, 0.5, 1.0)


def grid() -> list[Point]:
    """Every model of the study in the order it runs: seed 0 at `FIRST_SHARES` in every cell (cheapest cell first),
    then seed 0 at the other shares, then the extra seeds."""
    points = [
        Point(share, tokens, layers, seed)
        for tokens in IMAGE_TOKENS
        for layers in LAYERS
        for share in SHARES
        for seed in (0, *EXTRA_SEEDS.get(share, ()))
    ]

    def order(p: Point):
        phase = 2 if p.seed else (0 if p.share in FIRST_SHARES else 1)
        return (phase, p.image_tokens * p.layers, p.layers, p.share, p.seed)

    return sorted(points, key=order)


#: ``--only`` keys: the Point field each names and the values the grid has.
ONLY_KEYS = {"share": ("share", SHARES), "tokens": ("image_tokens", IMAGE_TOKENS), "layers": ("layers", LAYERS)}


def parse_only(items: list[str] | None) -> dict[str, tuple]:
    """``["share=0,0.8", "tokens=16"]`` -> {Point field: allowed values}; refuses keys and values the grid lacks."""
    keys = {**ONLY_KEYS, "seed": ("seed", tuple(sorted({p.seed for p in grid()})))}
    out: dict[str, tuple] = {}
    for item in items or ():
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or key not in keys or not text.strip():
            raise OptionError(
                f"--only {item!r}: write KEY=VALUE[,VALUE...] with KEY one of {', '.join(keys)} (e.g. share=0,0.8)."
            )
        field, allowed = keys[key]
        values = []
        for v in text.split(","):
            try:
                number = float(v)
            except ValueError:
                number = math.nan
            match = [a for a in allowed if math.isclose(a, number)]
            if not match:
                raise OptionError(
                    f"--only {item!r}: the grid has no {key} {v.strip()!r} (it has {', '.join(f'{a:g}' for a in allowed)})."
                )
            values.append(match[0])
        out[field] = tuple(values)
    return out


def select(points: list[Point], only: dict[str, tuple]) -> list[Point]:
    """The points whose every field named in ``only`` takes one of its values."""
    return [p for p in points if all(getattr(p, f) in vals for f, vals in only.items())]


def scaled(recipe: native.NativeConfig, scale: float) -> native.NativeConfig:
    """``recipe`` with its main-phase and VQ steps multiplied by ``scale`` (at least 2 each)."""
    return dataclasses.replace(
        recipe, steps=max(2, round(recipe.steps * scale)), vq_steps=max(2, round(recipe.vq_steps * scale))
    )


def settings(recipe: native.NativeConfig, scale: float, plan, heldout: dict | None) -> dict:
    """What a study directory is: a resume must have the same (the factors are per point, so not here)."""
    cfg = dataclasses.asdict(scaled(recipe, scale))
    for factor in ("generation_share", "image_tokens", "layers"):
        cfg.pop(factor)
    return {
        "study": "emergence",
        "scale": scale,
        "recipe": cfg,
        "understanding_floor": UNDERSTANDING_FLOOR,
        "plan": [[name, experiment, dict(s)] for name, experiment, s in plan],
        "heldout": heldout,
    }


def _check_settings(out: Path, wanted: dict) -> None:
    path = out / "study.json"
    if path.is_file():
        there = json.loads(path.read_text())
        if there != json.loads(json.dumps(wanted)):
            keys = sorted(k for k in set(there) | set(wanted) if there.get(k) != json.loads(json.dumps(wanted)).get(k))
            raise OptionError(
                f"{out} holds a study with other settings ({', '.join(keys)} differ; see {path}): give another "
                "--out (and --work), or the same --scale as before."
            )
        return
    path.write_text(json.dumps(wanted, indent=2) + "\n")


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def train_point(point: Point, work: Path, recipe: native.NativeConfig, heldout: dict | None, progress: bool) -> Path:
    """The organism of ``point`` under ``work`` (trained unless its checkpoint with its card is already there).

    It trains into ``model.partial`` and is renamed when its card is written, so a killed training leaves no
    checkpoint that looks finished.
    """
    from .. import organisms

    final = work / point.name / "model"
    if (final / "card.json").is_file():
        return final
    partial = final.with_name("model.partial")
    for stale in (partial, final):
        if stale.exists():
            shutil.rmtree(stale)
    organisms.train(
        "native",
        partial,
        seed=point.seed,
        progress=progress,
        overrides=dataclasses.asdict(point.config(recipe)),
        heldout=heldout,
    )
    os.replace(partial, final)
    return final


def measure_point(point: Point, model: Path, work: Path, scale: float, plan, progress: bool, console: Console) -> Path:
    """Every run of ``plan`` on ``model`` through the demo's runner (resumes an interrupted run); its directory."""
    from ..demo import demo

    out = work / point.name / "measure"
    demo(out, {point.name: model}, scale=scale, progress=progress, console=console, plan=plan)
    return out


def refresh(results: pd.DataFrame, work: Path, scale: float, plan, progress: bool, console: Console) -> pd.DataFrame:
    """``results`` with every row whose checkpoint is still under ``work`` rebuilt from its run directories by the
    current `row_of` (its measuring time kept). A run of ``plan`` whose directory is missing is measured first, so
    deleting a run's directory measures that run again; if that fails, the model keeps its old row (said so).
    Rows of models no longer under ``work`` stay as they are."""
    points = {p.name: p for p in grid()}
    rows = []
    for old in results.to_dict("records"):
        point, model = points.get(old["model"]), work / str(old["model"]) / "model"
        if point is None or not (model / "card.json").is_file():
            rows.append(old)
            continue
        runs = work / point.name / "measure" / point.name
        missing = [name for name, _, _ in plan if not (runs / name).is_dir()]
        try:
            if missing:  # the demo measures what is missing; a complete run has nothing left and is only aggregated
                console.print(f"[bold]{point.name}[/bold]: measuring {', '.join(missing)} again")
                measure_point(point, model, work, scale, plan, progress, console)
            rows.append(row_of(point, model, runs.parent, old.get("measure_seconds", math.nan)))
        except Exception as e:  # noqa: BLE001 -- a failed re-measurement costs that model's update, not the study
            console.print(f"[red]{point.name}: its row keeps its old values[/red] ({type(e).__name__}: {e})")
            rows.append(old)
    return pd.DataFrame(rows) if rows else results


def row_of(point: Point, model: Path, measured: Path, seconds: float) -> dict:
    """One results row, read from the model's card and the measurement runs' own tables."""
    from ..demo import verdict as ablation_verdict

    card = json.loads((model / "card.json").read_text())
    row: dict = {
        "model": point.name,
        "generation_share": point.share,
        "trained_generation_share": point.trained_share,
        "image_tokens": point.image_tokens,
        "layers": point.layers,
        "seed": point.seed,
        "steps": card["config"]["steps"],
        "lm_final_loss": card["phases"]["lm"]["final_loss"],
        "train_seconds": card["train_seconds"],
        "measure_seconds": round(float(seconds), 1),
    }
    h = card.get("heldout")
    if h:
        row.update(
            heldout_vqa=h["vqa"]["accuracy"],
            heldout_vqa_chance=h["vqa"]["chance"],
            heldout_cider=h["captions"]["cider"],
            heldout_cider_chance=h["captions"]["chance"],
            heldout_classes=h["classes"]["accuracy"],
            heldout_classes_chance=h["classes"]["chance"],
        )
    runs = measured / point.name
    summary = pd.read_csv(measured / "summary.csv")
    summary = summary[summary["model"] == point.name]
    for task in TASKS:
        g = summary[summary["task"] == task].set_index("condition")
        # A baseline at or below chance gives no relative scores (the ablation refuses them): NaN, and said so.
        refused = (runs / f"ablation-{task}" / "manifest.json").is_file() and g.empty
        row[f"{task}_at_chance"] = refused
        if g.empty:
            for key in ("metric", "baseline", "eoi_relative", "image_relative"):
                row[f"{task}_{key}"] = math.nan
            continue
        row[f"{task}_metric"] = g.loc["baseline", "metric"]
        row[f"{task}_baseline"] = g.loc["baseline", "score"]
        row[f"{task}_eoi_relative"] = g.loc["eoi->text", "relative"]
        row[f"{task}_image_relative"] = g.loc["image->text", "relative"]
    if len(summary):
        rel = summary.groupby("condition")["relative"].mean()
        row["eoi_relative"] = rel.get("eoi->text", math.nan)
        row["image_relative"] = rel.get("image->text", math.nan)
        row["ablation_verdict"] = ablation_verdict(summary).get(point.name, "")
    else:
        row.update(
            eoi_relative=math.nan, image_relative=math.nan, ablation_verdict="no verdict: every baseline at chance"
        )
    for mode, name in SCANS.items():
        gate = runs / name / "tables" / "gate.csv"
        if gate.is_file():
            for key, value in pd.read_csv(gate).iloc[0].items():
                # the scan also quotes the other mode's figures (suffixed): that mode's own scan gives them here
                if key not in ("method", "mode") and not key.endswith(tuple(f"_{m}" for m in SCANS)):
                    row[f"{key}_{mode}"] = value
    positions = runs / SCANS["mask"] / "tables" / "positions.csv"
    if positions.is_file() and "sufficiency" in (table := pd.read_csv(positions)):
        eoi = table[table["role"] == "eoi"]
        if len(eoi) == 1 and row.get("whole_damage_mask", 0) > 0:
            row["eoi_necessity_mask"] = float(eoi["damage"].iloc[0]) / row["whole_damage_mask"]
            row["eoi_sufficiency_mask"] = float(eoi["sufficiency"].iloc[0])
    roles = runs / "cross-attention" / "tables" / "cross_attention_roles.csv"
    if roles.is_file():
        eoi = pd.read_csv(roles).query("role == 'eoi'").sort_values("layer")
        row["eoi_attention_share"] = float(eoi["fraction"].mean())
        row["eoi_attention_share_max"] = float(eoi["fraction"].max())
        row["eoi_attention_share_layer"] = int(eoi["layer"].iloc[int(np.argmax(eoi["fraction"].to_numpy()))])
    return row


# --- the registered rule ----------------------------------------------------------------------------------------


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` as numbers (NaN where missing or not a number; all NaN when the table lacks it)."""
    return pd.to_numeric(df[name], errors="coerce") if name in df else pd.Series(math.nan, index=df.index)


def judge(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` with ``included`` (the model reads the image and has a mask-mode gate index) and ``gate``."""
    df = results.copy()
    index, low = _column(df, "gate_index_mask"), _column(df, "gate_low_mask")
    reads = _column(df, "heldout_vqa") >= READS_IMAGE * _column(df, "heldout_vqa_chance")
    df["included"] = reads & np.isfinite(index)
    ablation = df["ablation_verdict"].fillna("").astype(str) if "ablation_verdict" in df else ""
    agrees = ablation.str.contains("a narrow gate") if isinstance(ablation, pd.Series) else False
    df["gate"] = df["included"] & (index >= GATE_LEVEL) & (low >= GATE_LEVEL) & agrees
    return df


def _rank_corr(x_ranks: np.ndarray, y_ranks: np.ndarray) -> np.ndarray:
    """Pearson correlation of rank vectors along the last axis (``y_ranks`` may be a stack of permutations)."""
    x = x_ranks - x_ranks.mean()
    y = y_ranks - y_ranks.mean(-1, keepdims=True)
    den = np.sqrt((x**2).sum() * (y**2).sum(-1))
    return np.where(den > 0, (y * x).sum(-1) / np.where(den > 0, den, 1), np.nan)


def trend(
    results: pd.DataFrame, column: str = "gate_index_mask", *, permutations: int = PERMUTATIONS, seed: int = 0
) -> dict:
    """Mean over image length x depth cells of the Spearman correlation between generation share and ``column``
    (analysed models; cells with at least `MIN_CELL` and a non-constant ``column``), and its one-sided
    permutation p-values for a rise (``p_increase``) and a fall (``p_decrease``): ``column`` shuffled within
    each cell, ``permutations`` times."""
    df = judge(results)
    df = df[df["included"] & np.isfinite(_column(df, column))]
    rng = np.random.default_rng(seed)
    cells, observed, null = {}, [], []
    for (tokens, layers), g in df.groupby(["image_tokens", "layers"]):
        y = _column(g, column).to_numpy(dtype=float)
        if len(g) < MIN_CELL or np.ptp(y) == 0 or g["generation_share"].nunique() < 2:
            continue
        xr = pd.Series(g["generation_share"].to_numpy()).rank().to_numpy()
        yr = pd.Series(y).rank().to_numpy()
        rho = float(_rank_corr(xr, yr))
        cells[f"{int(tokens)} tokens, {int(layers)} layers"] = {"spearman": rho, "n": len(g)}
        observed.append(rho)
        null.append(_rank_corr(xr, rng.permuted(np.tile(yr, (permutations, 1)), axis=1)))
    if len(observed) < 2:
        return {"column": column, "cells": cells, "statistic": math.nan, "p_increase": math.nan, "p_decrease": math.nan}
    stat = float(np.mean(observed))
    perm = np.nanmean(np.stack(null), 0)
    return {
        "column": column,
        "cells": cells,
        "statistic": stat,
        "p_increase": float((1 + np.sum(perm >= stat - 1e-12)) / (1 + permutations)),
        "p_decrease": float((1 + np.sum(perm <= stat + 1e-12)) / (1 + permutations)),
        "permutations": permutations,
    }


def verdict(results: pd.DataFrame, *, permutations: int = PERMUTATIONS) -> dict:
    """The registered rule applied to ``results``: the outcome, the trend tests and the models with a gate."""
    df = judge(results)
    primary = trend(results, "gate_index_mask", permutations=permutations)
    secondary = {
        c: trend(results, c, permutations=permutations)
        for c in ("gate_index_zero", "eoi_relative", "eoi_attention_share")
        if c in results
    }
    exploratory = {c: trend(results, c, permutations=permutations) for c in EXPLORATORY if c in results}
    gates = df[df["gate"]]
    if not math.isfinite(primary["statistic"]):
        outcome = "not enough models"
    elif primary["p_increase"] < ALPHA:
        outcome = (
            "gate emerges with generation"
            if (gates["generation_share"] >= 0.5).any()
            else "generation concentrates, no gate"
        )
    elif primary["p_decrease"] < ALPHA:
        outcome = "reverse"
    else:
        outcome = "no effect of generation"
    index = _column(df, "gate_index_mask")[df["included"]]
    planned = len(grid())
    return {
        "outcome": outcome,
        "meaning": OUTCOMES[outcome],
        "models": len(df),
        "planned": planned,
        "complete": len(df) >= planned,
        "analysed": int(df["included"].sum()),
        "excluded": df.loc[~df["included"], "model"].tolist(),
        "gates": gates["model"].tolist(),
        "gate_index_mask_range": [float(index.min()), float(index.max())] if len(index) else None,
        "trend": primary,
        "secondary": secondary,
        "exploratory": exploratory,
    }


# --- the figure ---------------------------------------------------------------------------------------------------


#: Upper limit of the gate-index axes; a larger index (the whole image side barely matters, so the ratio is
#: unstable) is drawn at the edge with its value.
INDEX_TOP = 1.3


def figure(results: pd.DataFrame, path: Path) -> Path:
    """Gate index vs generation share (mask and zero mode), one line per image length x depth through the mean over
    the analysed models (`judge`), every model a point (hollow: not analysed; square: seed 1) with its interval;
    below, [EOI]->text relative score and [EOI]'s attention share."""
    from ..plots import COLORS, plt

    panels = [
        ("gate_index_mask", "gate index, mask mode (primary)", "gate_low_mask", "gate_high_mask"),
        ("gate_index_zero", "gate index, zero mode", "gate_low_zero", "gate_high_zero"),
        ("eoi_relative", "ablation: [EOI]→text knocked out,\nmean relative score (zero mode)", None, None),
        ("eoi_attention_share", "[EOI]'s share of text→image attention\n(mean over layers)", None, None),
        ("eoi_sufficiency_mask", "[EOI] alone: sufficiency, mask mode\n(exploratory, not registered)", None, None),
        ("eoi_necessity_mask", "[EOI] knocked out: necessity, mask mode\n(exploratory, not registered)", None, None),
    ]
    judged = judge(results)
    fig, axes = plt.subplots(3, 2, figsize=(11, 11.5))
    cells = sorted({(int(t), int(l)) for t, l in zip(judged["image_tokens"], judged["layers"])})
    for ax, (col, label, low, high) in zip(axes.flat, panels):
        if col not in judged:
            ax.set_visible(False)
            continue
        index = col.startswith("gate_index") or col == "eoi_necessity_mask"  # ratios to a possibly tiny damage
        for j, (tokens, layers) in enumerate(cells):
            g = judged[(judged["image_tokens"] == tokens) & (judged["layers"] == layers)]
            g = g.assign(y=_column(g, col)).sort_values("generation_share")
            color = COLORS[j % len(COLORS)]
            mean = g[g["included"]].groupby("generation_share")["y"].mean()
            line = np.minimum(mean.to_numpy(), INDEX_TOP) if index else mean.to_numpy()  # off-scale: to the edge
            ax.plot(mean.index, line, "-", color=color, lw=1.2, label=f"{tokens} image tokens, {layers} layers")
            x = g["generation_share"].to_numpy() + (j - (len(cells) - 1) / 2) * 0.012
            y = g["y"].to_numpy()
            shown = np.minimum(y, INDEX_TOP) if index else y
            if low and high and low in g and high in g:
                err = np.vstack([y - _column(g, low).to_numpy(), _column(g, high).to_numpy() - y])
                ok = y <= INDEX_TOP
                ax.errorbar(
                    x[ok], y[ok], yerr=np.clip(np.nan_to_num(err[:, ok]), 0, None), fmt="none", ecolor=color, lw=0.7
                )
            for seed, marker in ((0, "o"), (1, "s")):
                for included, face in ((True, color), (False, "none")):
                    m = (g["seed"].to_numpy() == seed) & (g["included"].to_numpy() == included)
                    ax.scatter(x[m], shown[m], s=22, marker=marker, facecolor=face, edgecolor=color, zorder=3)
            if index:
                for xi, yi in zip(x[y > INDEX_TOP], y[y > INDEX_TOP]):
                    # one line per cell, so the values of cells at the same share never overprint each other
                    ax.annotate(
                        f"{yi:.3g}↑",
                        (xi, INDEX_TOP),
                        textcoords="offset points",
                        xytext=(-30, -12 - 9 * j),
                        fontsize=7,
                        color=color,
                    )
        if index or col == "eoi_sufficiency_mask":
            ax.axhline(GATE_LEVEL, color="k", lw=0.8, ls="--")
        if index:
            ax.set_ylim(min(-0.05, float(np.nanmin(_column(judged, col), initial=0.0)) - 0.05), INDEX_TOP + 0.05)
        ax.set_xticks(SHARES, [f"{s:g}" if s < 1 else "1.0*" for s in SHARES])
        ax.set(xlabel="share of caption → image generation sequences", ylabel=label)
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        f"When does a gate emerge? Native organisms over the grid ({len(judged)} of {len(grid())} models). Points: "
        "models (square: seed 1; hollow: not analysed);\nline: mean over the analysed models. *At 1.0, "
        f"{UNDERSTANDING_FLOOR:g} of the sequences stay understanding tasks. Dashed: threshold {GATE_LEVEL:g}.",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the study ------------------------------------------------------------------------------------------------------


def finish(out: Path, results: pd.DataFrame, *, permutations: int = PERMUTATIONS) -> dict:
    """Write results.csv, the figure and verdict.json from ``results``; returns the verdict."""
    order = {p.name: i for i, p in enumerate(grid())}
    results = results.sort_values("model", key=lambda s: s.map(lambda n: order.get(n, len(order)))).reset_index(
        drop=True
    )
    for column in INTEGER_COLUMNS.intersection(results.columns):  # not 16.0 tokens: a NaN elsewhere made it float
        results[column] = pd.to_numeric(results[column], errors="coerce").round().astype("Int64")
    _write_csv(results, out / "results.csv")
    if not len(results):
        return {}
    figure(results, out / "emergence.png")
    v = verdict(results, permutations=permutations)
    (out / "verdict.json").write_text(json.dumps(v, indent=2, default=float) + "\n")
    (out / "summary.md").write_text(summary_markdown(results, v))
    return v


def _fmt(value, digits: int = 2) -> str:
    number = pd.to_numeric(value, errors="coerce")
    return "–" if pd.isna(number) else f"{number:.{digits}f}"


def _exploratory_lines(v: dict) -> list[str]:
    """The exploratory trend tests (not registered, never in the outcome), as one Markdown paragraph."""
    tests = [(c, t) for c, t in v.get("exploratory", {}).items() if math.isfinite(t["statistic"])]
    if not tests:
        return []
    parts = [
        f"{c} {_fmt(t['statistic'])} (p(rise) {_fmt(t['p_increase'], 4)}, p(fall) {_fmt(t['p_decrease'], 4)})"
        for c, t in tests
    ]
    return ["*Exploratory, not registered* (same test, other columns): " + "; ".join(parts) + ".", ""]


def summary_markdown(results: pd.DataFrame, v: dict) -> str:
    """The verdict and one table row per model (the headline columns of results.csv), as Markdown."""
    t = v["trend"]
    lines = [
        f"**{v['outcome']}** — {v['meaning']} ({v['models']} of {v['planned']} models, {v['analysed']} analysed; "
        f"not analysed: {', '.join(v['excluded']) or 'none'}; gates: {', '.join(v['gates']) or 'none'}).",
        "",
        f"Trend statistic (mean within-cell Spearman, mask-mode gate index): {_fmt(t['statistic'])}, "
        f"p(rise) {_fmt(t['p_increase'], 4)}, p(fall) {_fmt(t['p_decrease'], 4)}; per cell: "
        + (", ".join(f"{c} {_fmt(r['spearman'])} (n={r['n']})" for c, r in t["cells"].items()) or "none")
        + ".",
        "",
        *_exploratory_lines(v),
        "| model | VQA (chance) | CIDEr-D (chance) | gate index, mask [95%] | positions for 90% | top | gate index, zero "
        "| [EOI]→text | image→text | [EOI] attention | [EOI] alone (S) | analysed | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in judge(results).iterrows():
        lines.append(
            f"| {r['model']} | {_fmt(r.get('heldout_vqa'))} ({_fmt(r.get('heldout_vqa_chance'))}) | "
            f"{_fmt(r.get('heldout_cider'))} ({_fmt(r.get('heldout_cider_chance'))}) | "
            f"{_fmt(r.get('gate_index_mask'), 3)} [{_fmt(r.get('gate_low_mask'), 3)}, {_fmt(r.get('gate_high_mask'), 3)}] | "
            f"{_fmt(r.get('positions_for_90_mask'), 1)} | {r.get('top_position_mask', '–')} | "
            f"{_fmt(r.get('gate_index_zero'), 3)} | {_fmt(r.get('eoi_relative'))} | {_fmt(r.get('image_relative'))} | "
            f"{_fmt(r.get('eoi_attention_share'))} | {_fmt(r.get('eoi_sufficiency_mask'))} | "
            f"{'yes' if r['included'] else 'no'} | {'yes' if r['gate'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def run_study(
    out: str | Path = "studies/emergence",
    work: str | Path = "runs/emergence",
    *,
    scale: float = 1.0,
    only: dict[str, tuple] | None = None,
    recipe: native.NativeConfig | None = None,
    plan=None,
    heldout: dict | None = None,
    progress: bool = True,
    console: Console | None = None,
    command: list[str] | None = None,
    permutations: int = PERMUTATIONS,
) -> pd.DataFrame:
    """Train and measure every grid point (``only``: the subset, see `parse_only`) not yet in ``OUT/results.csv``;
    returns the results. ``scale`` multiplies the training steps and the sample sizes; ``recipe`` (default
    `RECIPE`), ``plan`` (default `PLAN`) and ``heldout`` (the card's held-out sizes, None: the organisms'
    default) are the recipe and the measurements."""
    recipe, plan = recipe or RECIPE, plan or PLAN
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise OptionError(f"--scale must be a finite number above 0, got {scale!r}.")
    console = console or Console()
    out, work = Path(out), Path(work)
    for path, flag in ((out, "--out"), (work, "--work")):
        if path.exists() and not path.is_dir():
            raise OptionError(f"{flag} {path} is a file; give a directory.")
    out.mkdir(parents=True, exist_ok=True)
    command_text = shlex.join(command if command is not None else sys.argv)
    lock = DirectoryLock(out)
    lock.acquire(command_text)
    try:
        _check_settings(out, settings(recipe, scale, plan, heldout))
        with open(out / "commands.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}  {command_text}\n")
        path = out / "results.csv"
        results = pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame({"model": []})
        results = refresh(results, work, scale, plan, progress, console)
        done = set(results["model"])
        points = select(grid(), only or {})
        todo = [p for p in points if p.name not in done]
        console.print(
            f"[bold]emergence study[/bold]: {len(points)} model(s) selected, {len(points) - len(todo)} already "
            f"measured, {len(todo)} to do ({out})"
        )
        cfg = scaled(recipe, scale)
        failed = []
        for i, point in enumerate(todo, 1):
            stage = "training"
            try:
                console.print(
                    f"[bold][{i}/{len(todo)}] {point.name}[/bold]: training (generation share {point.trained_share:g})"
                )
                model = train_point(point, work, cfg, heldout, progress)
                cards = out / "cards" / point.name
                cards.mkdir(parents=True, exist_ok=True)
                for name in ("card.json", "CARD.md"):
                    shutil.copyfile(model / name, cards / name)
                stage = "measuring"
                console.print(f"[bold][{i}/{len(todo)}] {point.name}[/bold]: measuring")
                start = time.perf_counter()
                measured = measure_point(point, model, work, scale, plan, progress, console)
                row = row_of(point, model, measured, time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 -- a failed model costs that model (recorded), not the study
                reason = f"{type(e).__name__}: {' '.join(str(e).split())}"
                console.print(f"[red]{point.name}: {stage} failed[/red] ({reason}); it is retried on the next run")
                failed.append({"model": point.name, "stage": stage, "reason": reason})
                continue
            results = pd.concat([results[results["model"] != point.name], pd.DataFrame([row])], ignore_index=True)
            finish(out, results, permutations=permutations)
        failures = out / "failures.csv"
        if failed:
            _write_csv(pd.DataFrame(failed), failures)
            console.print(f"[yellow]{len(failed)} model(s) failed[/yellow]; see {failures}")
        elif failures.exists():
            failures.unlink()
        v = finish(out, results, permutations=permutations)
        if v:
            console.print(
                f"[bold]verdict[/bold] ({v['models']} of {v['planned']} models, {v['analysed']} analysed): "
                f"{v['outcome']} — {v['meaning']}. Trend statistic {v['trend']['statistic']:.3f}, "
                f"p(rise) {v['trend']['p_increase']:.4f}; gates: {', '.join(v['gates']) or 'none'}."
            )
        return pd.read_csv(path)
    finally:
        lock.release()
