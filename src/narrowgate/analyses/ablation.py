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

import numpy as np
import pandas as pd

from ..data import tasks
from ..data.prompts import NEW_TOKENS, caption_prompt, class_prompt, vqa_prompt
from ..engine.interventions import Capture, Knockout
from ..engine.shared import Condition
from ..errors import BaselineAtChance, OptionError
from ..metrics import cider, cider_chance, neighborhood_overlap_per_point, overlap_chance, vqa_accuracy, vqa_chance
from ..metrics.overlap import check_k, overlap_k
from ..parsing import parse_layer_set
from ..store import BFloat16
from .base import Experiment, register, stack
from .options import MODES, ClassPrompt, RunConfig, TaskPrompts, check_sweep, option, sweep_step

DEFAULT_SOURCES = ("eoi", "image", "last_image")


def parse_layers(text: str | None, n_layers: int, option: str = "--layers") -> tuple[int, ...] | None:
    """'0-31' or '3,5,7' -> indices below ``n_layers`` (`narrowgate.errors.parse_layer_set`); None -> all.

    Raises `OptionError` naming ``option`` for a malformed or empty set or an index out of range.
    """
    if text is None:
        return None
    out = parse_layer_set(str(text), option=option)
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise OptionError(
            f"{option} {text}: {bad} out of range 0..{n_layers - 1} (the model has "
            f"{n_layers if option == '--layers' else n_layers - 1} layers)."
        )
    return out


def text_metric(task: str, tokenize: str) -> str:
    """The name of the score of generated answers (vqa) or captions."""
    return "vqa_accuracy" if task == "vqa" else ("cider" if tokenize == "ptb" else "cider (raw strings)")


def text_score(task: str, preds: dict, examples: dict, tokenize: str) -> float:
    """VQA accuracy (mean over examples) or corpus CIDEr-D of ``preds`` (example id -> generated text)."""
    return float(np.mean(text_scores(task, preds, examples, tokenize)))


def text_scores(task: str, preds: dict, examples: dict, tokenize: str) -> np.ndarray:
    """Per-example VQA accuracy or per-image CIDEr-D of ``preds``, in ``preds``' order; their mean is the
    task's score (corpus CIDEr-D is the mean of the per-image scores, with IDF from the whole set)."""
    if task == "vqa":
        return np.array([vqa_accuracy(p, examples[i].answers) for i, p in preds.items()], dtype=np.float64)
    per = cider(preds, {i: list(examples[i].references) for i in preds}, tokenize=tokenize)[1]
    return np.array([per[i] for i in preds], dtype=np.float64)


def standard_errors(per: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """Standard errors over examples of the mean of ``per`` and of its ratio to the mean of ``base``.

    The ratio's is the delta method on the paired examples: mean(per)/mean(base) - R is, to first order,
    the mean of per_i - R base_i divided by mean(base). NaN below two examples, or for a zero baseline.
    """
    n = len(per)
    if n < 2:
        return float("nan"), float("nan")
    se = float(np.std(per, ddof=1) / np.sqrt(n))
    mean_base = float(np.mean(base))
    if mean_base == 0:
        return se, float("nan")
    ratio = float(np.mean(per)) / mean_base
    return se, float(np.std(per - ratio * base, ddof=1) / np.sqrt(n) / abs(mean_base))


def text_chance(task: str, preds: dict, examples: dict, tokenize: str, seed: int) -> float:
    """What the baseline's own answers score on other images (`narrowgate.metrics.chance`): the image-blind
    level a score must beat to say the model reads the image."""
    if task == "vqa":
        groups = {i: examples[i].meta.get("question_type") or examples[i].question for i in preds}
        return vqa_chance(preds, {i: examples[i].answers for i in preds}, groups)
    return cider_chance(preds, {i: list(examples[i].references) for i in preds}, seed=seed, tokenize=tokenize)


#: How each task's chance level is measured (the refusal names it).
CHANCE_IS = {
    "vqa": "the baseline's answers scored against other images' questions of the same type",
    "captions": "the baseline's captions given to other images",
    "classes": "the overlap of random neighbours with the labels",
}


def refuse_at_chance(task: str, metric: str, base: float, chance: float, n: int, cfg: dict) -> None:
    """Raise `BaselineAtChance` when the baseline does not beat chance: relative scores would be undefined."""
    if base > chance:
        return
    key = {"vqa": "vqa_prompt", "captions": "caption_prompt"}.get(task, "prompt")
    raise BaselineAtChance(
        f"The baseline scores {base:.4f} {metric} on {n} examples, at or below chance ({chance:.4f}: "
        f"{CHANCE_IS[task]}), so scores relative to it are undefined: the model does not solve this task as asked. "
        f"Check the model and its prompt ({key} {cfg.get(key)!r}; a checkpoint sets its own in narrowgate.json, "
        "see docs/checkpoint-prompts.md); the records are kept."
    )


def conditions(cfg: dict, n_layers: int) -> list[Condition]:
    sources = list(DEFAULT_SOURCES) + [r for r in cfg.get("knockout") or () if r not in DEFAULT_SOURCES]
    mode = cfg["mode"]
    windows: list[tuple[int, ...] | None]
    if cfg.get("sweep"):
        step = sweep_step(cfg, n_layers)
        sweep = [tuple(range(n_layers - w, n_layers)) for w in range(step, n_layers + 1, step)]
        if sweep[-1][0] != 0:
            sweep.append(tuple(range(n_layers)))
        windows = list(sweep)
    else:
        windows = [parse_layers(cfg.get("layers"), n_layers)]
    out = [Condition("baseline")]
    for layers in windows:
        specs = [Knockout(s, "text", layers=layers, mode=mode) for s in sources]
        specs.append(Knockout("eoi", ("eoi", "text"), layers=layers, mode=mode))
        out += [Condition(k.name, knockouts=(k,)) for k in specs]
    return out


@dataclass
class AblationConfig(ClassPrompt, TaskPrompts, RunConfig):
    mode: str = option("zero", "Knockout mode: zero (the paper's) or mask (exactly blind).", choices=MODES)
    layers: str | None = option(
        None, "Decoder layers of the knockouts, e.g. 0-31 or 3,5,7 (default: all).", parse="layers"
    )
    sweep: bool = option(False, "Each knockout also over growing layer windows ending at the last layer (SM 6.3).")
    sweep_step: int = option(1, "Window growth per step with --sweep.", min=1)
    knockout: list[str] | None = option(None, "Extra source role to knock out (repeatable).", parse="roles")
    k: int = option(30, "Neighbours of the neighbourhood overlap on ImageNet (the paper: 30).", min=1)


@register
class Ablation(Experiment):
    name = "ablation"
    task = "vqa"
    config = AblationConfig

    def prompt_kinds(self, cfg):
        return ({"classes": "class"}.get(self.task_of(cfg), self.task_of(cfg)),)

    def requested(self, cfg):
        if self.task_of(cfg) == "classes":
            out = {"n_per_class": cfg.get("n_per_class") or 100}
            return {**out, "n": cfg["n"]} if cfg.get("n") else out
        return {"n": cfg.get("n") or 2000}

    def examples(self, cfg):
        return tasks.load(
            cfg["data"],
            self.task_of(cfg),
            cfg.get("data_dir"),
            seed=cfg["seed"],
            allow_fewer=bool(cfg.get("allow_fewer")),
            **self.requested(cfg),
        )

    def check(self, examples, cfg) -> None:
        check_sweep(cfg, self.defaults["sweep_step"])
        if len(examples) < 2:
            raise OptionError(
                f"--n {len(examples)}: a score over one example has no standard error (and CIDEr-D over one image "
                "is 0 by construction); give --n 2 or more."
            )
        if cfg.get("sweep") and cfg.get("layers") is not None:
            raise OptionError(
                f"--sweep makes its own layer windows (growing, ending at the last layer), so --layers "
                f"{cfg['layers']} would be ignored: drop --layers, or --sweep to knock out in layers {cfg['layers']} only."
            )
        if self.task_of(cfg) == "classes":
            check_k((e.label for e in examples), cfg["k"])
        if self.task_of(cfg) == "vqa":
            tasks.require_answers(examples, cfg.get("data_dir"))

    def check_model(self, cfg, n_layers) -> None:
        conditions(cfg, n_layers)

    def process(self, vlm, units, images, cfg):
        task = self.task_of(cfg)
        conds = conditions(cfg, vlm.n_layers)
        exs = [u.examples[0] for u in units]
        imgs = [im[0] for im in images]
        if task == "classes":
            batch = vlm.prepare(imgs, [class_prompt(cfg)] * len(units))
            outs = vlm.forward_conditions(batch, conds, capture=Capture("last", resids=(vlm.n_layers,)))
            rows = [{"example_id": u.id, "label": e.label} for u, e in zip(units, exs)]
            arrays = {
                f"last:{c.name}": BFloat16(outs[c.name].residuals["last"][:, 0].numpy(), (vlm.n_layers,)) for c in conds
            }
            return rows, arrays
        prompts = [vqa_prompt(cfg, e.question) for e in exs] if task == "vqa" else [caption_prompt(cfg)] * len(units)
        batch = vlm.prepare(imgs, prompts)
        gens = vlm.generate_conditions(batch, conds, max_new_tokens=int(cfg.get("max_new_tokens") or NEW_TOKENS[task]))
        rows = []
        for b, u in enumerate(units):
            row = {"example_id": u.id}
            for c in conds:
                row[f"pred:{c.name}"] = vlm.decode(gens[c.name][b : b + 1], batch)[0].strip()
            rows.append(row)
        return rows, {}

    def aggregate(self, records, cfg, info):
        task = self.task_of(cfg)
        names = [c.name for c in conditions(cfg, info["n_layers"])]
        rows = []
        if task == "classes":
            labels = records.rows["label"].to_numpy()
            k = overlap_k(labels, cfg["k"])
            per = {n: neighborhood_overlap_per_point(stack(records.arrays, f"last:{n}"), labels, k=k) for n in names}
            metric = "overlap@last"
            chance = overlap_chance(labels.tolist())
        else:
            ids = records.rows["example_id"].tolist()
            wanted = set(ids)
            examples = {e.id: e for e in self.examples(cfg) if e.id in wanted}
            tokenize = cfg.get("cider_tokenize") or "ptb"
            metric = text_metric(task, tokenize)
            preds = {n: dict(zip(ids, records.rows[f"pred:{n}"])) for n in names}
            per = {n: text_scores(task, preds[n], examples, tokenize) for n in names}
            chance = text_chance(task, preds["baseline"], examples, tokenize, cfg["seed"])
        base = float(np.mean(per["baseline"]))
        refuse_at_chance(task, metric, base, chance, len(records.rows), cfg)
        for n in names:
            score = float(np.mean(per[n]))
            se, relative_se = standard_errors(per[n], per["baseline"])
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

    def figures(self, tables, info, store):
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

    def compare(self, runs):
        """The conditions' relative scores, one bar per run."""
        from ..plots import COLORS

        df = pd.concat([t["ablation"].assign(model=label) for label, t, _ in runs])
        wide = df.pivot(index="condition", columns="model", values="relative")
        ax = wide.plot.bar(figsize=(8, 4), color=COLORS[: len(runs)])
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set(ylabel="score relative to baseline", title="Attention knockout")
        return ax.get_figure()
