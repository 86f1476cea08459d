"""Sec. 4.3: task performance with attention knockouts, on VQAv2, COCO, Flickr30k and ImageNet.

Conditions: the baseline and, for each source role, ``role -> text`` (``eoi``, ``image``,
``last_image`` and any ``--knockout`` role), plus the authors' variant that also blocks [EOI]
from attending to itself (``eoi -> eoi+text``). Knockouts stay on while generating. With
``--layers`` every knockout applies to that window; with ``--sweep`` each one is repeated for
growing windows ending at the last layer (SM 6.3). Scores: VQA accuracy (VQAv2), CIDEr-D
(captions), neighbourhood overlap of the residual at ``last`` after the last layer (ImageNet), each
beside its chance level (`narrowgate.metrics.chance`); a baseline at or below chance stops the run
(`BaselineAtChance`), since scores relative to it would be undefined. Each score has its standard error
over the examples (``se``), and each relative score its own (``relative_se``, paired: the same examples under
both conditions). A score needs two examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from ..data import ClassExample, tasks
from ..data.prompts import NEW_TOKENS, caption_prompt, class_prompt, vqa_prompt
from ..deprecation import moved
from ..engine.interventions import Capture, Knockout
from ..engine.shared import Condition
from ..errors import BaselineAtChance, OptionError
from ..metrics import (
    neighborhood_overlap_per_point,
    overlap_chance,
    scores,
)
from ..metrics.overlap import check_k, overlap_k
from ..store import BFloat16
from . import options
from .base import Experiment, Sample, Unit, register, stack
from .options import MODES, ClassPrompt, RunConfig, TaskPrompts, check_sweep, option, sweep_step

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..store import RunStore, Shard
    from ..vlm import VLM

DEFAULT_SOURCES = ("eoi", "image", "last_image")

#: Names that lived here until 0.2 and their new homes (still importable from here, with a warning, until 0.4.0).
__getattr__ = moved(
    __name__,
    "0.3.0",
    "0.4.0",
    parse_layers="narrowgate.analyses.options",
    text_metric="narrowgate.metrics.scores",
    text_score="narrowgate.metrics.scores",
    text_scores="narrowgate.metrics.scores",
    standard_errors="narrowgate.metrics.scores",
    text_chance="narrowgate.metrics.scores",
)


#: How each task's chance level is measured (the refusal names it).
CHANCE_IS = {
    "vqa": "the baseline's answers scored against other images' questions of the same type",
    "captions": "the baseline's captions given to other images",
    "classes": "the overlap of random neighbours with the labels",
}


def refuse_at_chance(task: str, metric: str, base: float, chance: float, n: int, cfg: AblationConfig) -> None:
    """Raise `BaselineAtChance` when the baseline does not beat chance: relative scores would be undefined."""
    if base > chance:
        return
    key, prompt = {
        "vqa": ("vqa_prompt", cfg.vqa_prompt),
        "captions": ("caption_prompt", cfg.caption_prompt),
    }.get(task, ("prompt", cfg.prompt))
    raise BaselineAtChance(
        f"The baseline scores {base:.4f} {metric} on {n} examples, at or below chance ({chance:.4f}: "
        f"{CHANCE_IS[task]}), so scores relative to it are undefined: the model does not solve this task as asked. "
        f"Check the model and its prompt ({key} {prompt!r}; a checkpoint sets its own in narrowgate.json, "
        "see docs/checkpoint-prompts.md); the records are kept."
    )


def conditions(cfg: AblationConfig, n_layers: int) -> list[Condition]:
    """The baseline and each knockout (`DEFAULT_SOURCES`, ``--knockout`` roles, [EOI] -> [EOI] and text) in the
    ``--layers`` window, or in each growing window of ``--sweep``."""
    sources = list(DEFAULT_SOURCES) + [r for r in cfg.knockout or () if r not in DEFAULT_SOURCES]
    mode = cfg.mode
    windows: list[tuple[int, ...] | None]
    if cfg.sweep:
        step = sweep_step(cfg, n_layers)
        sweep = [tuple(range(n_layers - w, n_layers)) for w in range(step, n_layers + 1, step)]
        if sweep[-1][0] != 0:
            sweep.append(tuple(range(n_layers)))
        windows = list(sweep)
    else:
        windows = [options.parse_layers(cfg.layers, n_layers)]
    out = [Condition("baseline")]
    for layers in windows:
        specs = [Knockout(s, "text", layers=layers, mode=mode) for s in sources]
        specs.append(Knockout("eoi", ("eoi", "text"), layers=layers, mode=mode))
        out += [Condition(k.name, knockouts=(k,)) for k in specs]
    return out


@dataclass
class AblationConfig(ClassPrompt, TaskPrompts, RunConfig):
    """Settings of ``narrowgate run ablation``."""

    mode: str = option("zero", "Knockout mode: zero (the paper's) or mask (exactly blind).", choices=MODES)
    layers: str | None = option(
        None, "Decoder layers of the knockouts, e.g. 0-31 or 3,5,7 (default: all).", parse="layers"
    )
    sweep: bool = option(False, "Each knockout also over growing layer windows ending at the last layer (SM 6.3).")
    sweep_step: int = option(1, "Window growth per step with --sweep.", min=1)
    knockout: list[str] | None = option(None, "Extra source role to knock out (repeatable).", parse="roles")
    k: int = option(30, "Neighbours of the neighbourhood overlap on ImageNet (the paper: 30).", min=1)


@register
class Ablation(Experiment[AblationConfig]):
    """Task performance with attention knockouts (Sec. 4.3)."""

    name = "ablation"
    task = "vqa"
    config = AblationConfig

    def prompt_kinds(self, cfg: AblationConfig) -> tuple[str, ...]:
        """The one prompt of the run's task (``class`` for classes)."""
        return ({"classes": "class"}.get(self.task_of(cfg), self.task_of(cfg)),)

    def requested(self, cfg: AblationConfig) -> dict[str, int]:
        """``n`` examples (2,000), or ``n_per_class`` images per class (100) on classes."""
        if self.task_of(cfg) == "classes":
            out = {"n_per_class": cfg.n_per_class or 100}
            return {**out, "n": cfg.n} if cfg.n else out
        return {"n": cfg.n or 2000}

    def check(self, examples: Sample, cfg: AblationConfig) -> None:
        """Refuse a single example, ``--layers`` with ``--sweep``, a ``k`` the classes cannot support, and VQA
        examples without answers, before the model loads."""
        check_sweep(cfg, self.defaults["sweep_step"])
        if len(examples) < 2:
            raise OptionError(
                f"--n {len(examples)}: a score over one example has no standard error (and CIDEr-D over one image "
                "is 0 by construction); give --n 2 or more."
            )
        if cfg.sweep and cfg.layers is not None:
            raise OptionError(
                f"--sweep makes its own layer windows (growing, ending at the last layer), so --layers "
                f"{cfg.layers} would be ignored: drop --layers, or --sweep to knock out in layers {cfg.layers} only."
            )
        if self.task_of(cfg) == "classes":
            check_k((cast(ClassExample, e).label for e in examples), cfg.k)
        if self.task_of(cfg) == "vqa":
            tasks.require_answers(examples, cfg.data_dir)

    def check_model(self, cfg: AblationConfig, n_layers: int) -> None:
        """Refuse a ``--layers`` or ``--sweep-step`` the model's depth cannot support."""
        conditions(cfg, n_layers)

    def process(
        self, vlm: VLM, units: list[Unit], images: list[tuple], cfg: AblationConfig
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per unit, the residual at ``last`` after the last layer (classes) or the generated text (VQA, captions)
        under every condition."""
        task = self.task_of(cfg)
        conds = conditions(cfg, vlm.n_layers)
        exs = [u.examples[0] for u in units]
        imgs = [im[0] for im in images]
        if task == "classes":
            batch = vlm.prepare(imgs, [class_prompt(cfg.prompt, cfg.data)] * len(units))
            outs = vlm.forward_conditions(batch, conds, capture=Capture("last", resids=(vlm.n_layers,)))
            rows: list[dict[str, Any]] = [{"example_id": u.id, "label": e.label} for u, e in zip(units, exs)]
            arrays = {
                f"last:{c.name}": BFloat16(outs[c.name].residuals["last"][:, 0].numpy(), (vlm.n_layers,)) for c in conds
            }
            return rows, arrays
        if task == "vqa":
            prompts = [vqa_prompt(cfg.vqa_prompt, e.question) for e in exs]
        else:
            prompts = [caption_prompt(cfg.caption_prompt)] * len(units)
        batch = vlm.prepare(imgs, prompts)
        gens = vlm.generate_conditions(batch, conds, max_new_tokens=int(cfg.max_new_tokens or NEW_TOKENS[task]))
        rows = []
        for b, u in enumerate(units):
            row = {"example_id": u.id}
            for c in conds:
                row[f"pred:{c.name}"] = vlm.decode(gens[c.name][b : b + 1], batch)[0].strip()
            rows.append(row)
        return rows, {}

    def aggregate(self, records: Shard, cfg: AblationConfig, info: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """Table ``ablation``: per condition, the score, relative to the baseline, with standard errors and the
        chance level; a baseline at or below chance is refused (`refuse_at_chance`)."""
        task = self.task_of(cfg)
        names = [c.name for c in conditions(cfg, info["n_layers"])]
        rows = []
        if task == "classes":
            labels = records.rows["label"].to_numpy()
            k = overlap_k(labels, cfg.k)
            per = {n: neighborhood_overlap_per_point(stack(records.arrays, f"last:{n}"), labels, k=k) for n in names}
            metric = "overlap@last"
            chance = overlap_chance(labels.tolist())
        else:
            ids = records.rows["example_id"].tolist()
            wanted = set(ids)
            examples = {e.id: e for e in self.examples(cfg) if e.id in wanted}
            tokenize = cfg.cider_tokenize or "ptb"
            metric = scores.text_metric(task, tokenize)
            preds = {n: dict(zip(ids, records.rows[f"pred:{n}"])) for n in names}
            per = {n: scores.text_scores(task, preds[n], examples, tokenize) for n in names}
            chance = scores.text_chance(task, preds["baseline"], examples, tokenize, cfg.seed)
        base = float(np.mean(per["baseline"]))
        refuse_at_chance(task, metric, base, chance, len(records.rows), cfg)
        for n in names:
            score = float(np.mean(per[n]))
            se, relative_se = scores.standard_errors(per[n], per["baseline"])
            rows.append(
                {
                    "condition": n,
                    "metric": metric,
                    "score": score,
                    "relative": score / base,
                    "se": se,
                    "relative_se": relative_se,
                    "chance": float(chance),
                    "n": len(records.rows),
                    **({"k": k} if task == "classes" else {}),
                }
            )
        return {"ablation": pd.DataFrame(rows)}

    def figures(
        self, tables: dict[str, pd.DataFrame], info: dict[str, Any], store: RunStore, cfg: AblationConfig
    ) -> list[str]:
        """Each condition's score relative to the baseline, one bar per condition."""
        from ..plots import COLORS, has, plt, save

        if not has(tables, "ablation"):
            return []
        df = tables["ablation"]
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(df)), 3.8))
        ax.bar(range(len(df)), df["relative"], color=[COLORS[i % len(COLORS)] for i in range(len(df))])
        ax.set_xticks(range(len(df)), df["condition"], rotation=45, ha="right", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set(ylabel=f"{df['metric'].iloc[0]} relative to baseline", title="Attention knockout")
        return [save(fig, store, "ablation")]

    def compare(self, runs: list[tuple[str, dict, dict]]) -> Figure:
        """The conditions' relative scores, one bar per run."""
        from ..plots import COLORS

        df = pd.concat([t["ablation"].assign(model=label) for label, t, _ in runs])
        wide = df.pivot(index="condition", columns="model", values="relative")
        ax = wide.plot.bar(figsize=(8, 4), color=COLORS[: len(runs)])
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set(ylabel="score relative to baseline", title="Attention knockout")
        return ax.get_figure()
