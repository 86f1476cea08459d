"""Sec. 4.3: task performance with attention knockouts, on VQAv2, COCO, Flickr30k and ImageNet.

Conditions: the baseline and, for each source role, ``role -> text`` (``eoi``, ``image``,
``last_image`` and any ``--knockout`` role), plus the authors' variant that also blocks [EOI]
from attending to itself (``eoi -> eoi+text``). Knockouts stay on while generating. With
``--layers`` every knockout applies to that window; with ``--sweep`` each one is repeated for
growing windows ending at the last layer (SM 6.3). Scores: VQA accuracy (VQAv2), CIDEr-D
(captions), neighbourhood overlap of the residual at ``last`` after the last layer (ImageNet).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..engine.interventions import Capture, Knockout
from ..engine.shared import Condition
from ..errors import OptionError, parse_layer_set
from ..metrics import cider, neighborhood_overlap, vqa_accuracy
from . import tasks
from .base import Experiment, check_k, overlap_k, stack
from .prompts import NEW_TOKENS, caption_prompt, class_prompt, vqa_prompt

DEFAULT_SOURCES = ("eoi", "image", "last_image")
TASK_OF = {"vqav2": "vqa", "coco": "captions", "flickr30k": "captions", "imagenet": "classes"}


def parse_layers(text: str | None, n_layers: int) -> tuple[int, ...] | None:
    """'0-31' or '3,5,7' -> decoder layers (`narrowgate.errors.parse_layer_set`); None -> all.

    Raises `OptionError` naming ``--layers`` for a malformed or empty set or a layer out of range.
    """
    if text is None:
        return None
    out = parse_layer_set(str(text))
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise OptionError(f"--layers {text}: layers {bad} out of range 0..{n_layers - 1} (the model has {n_layers}).")
    return out


def conditions(cfg: dict, n_layers: int) -> list[Condition]:
    sources = list(DEFAULT_SOURCES) + [r for r in cfg.get("knockout") or () if r not in DEFAULT_SOURCES]
    mode = cfg["mode"]
    if cfg.get("sweep"):
        step = max(1, int(cfg.get("sweep_step") or 1))
        windows = [tuple(range(n_layers - w, n_layers)) for w in range(step, n_layers + 1, step)]
        if windows[-1][0] != 0:
            windows.append(tuple(range(n_layers)))
    else:
        windows = [parse_layers(cfg.get("layers"), n_layers)]
    out = [Condition("baseline")]
    for layers in windows:
        specs = [Knockout(s, "text", layers=layers, mode=mode) for s in sources]
        specs.append(Knockout("eoi", ("eoi", "text"), layers=layers, mode=mode))
        out += [Condition(k.name, knockouts=(k,)) for k in specs]
    return out


class Ablation(Experiment):
    name = "ablation"
    task = "vqa"
    defaults = {"mode": "zero", "k": 30}

    def _task(self, cfg):
        return cfg.get("task") or TASK_OF.get(cfg["data"], "vqa")

    def prompt_kinds(self, cfg):
        return ({"classes": "class"}.get(self._task(cfg), self._task(cfg)),)

    def requested(self, cfg):
        if self._task(cfg) == "classes":
            out = {"n_per_class": cfg.get("n_per_class") or 100}
            return {**out, "n": cfg["n"]} if cfg.get("n") else out
        return {"n": cfg.get("n") or 2000}

    def examples(self, cfg):
        return tasks.load(cfg["data"], self._task(cfg), cfg.get("data_dir"), seed=cfg["seed"],
                          allow_fewer=bool(cfg.get("allow_fewer")), **self.requested(cfg))

    def check(self, examples, cfg):
        if self._task(cfg) == "classes":
            check_k((e.label for e in examples), cfg["k"])

    def check_model(self, cfg, n_layers):
        conditions(cfg, n_layers)

    def process(self, vlm, units, images, cfg):
        task = self._task(cfg)
        conds = conditions(cfg, vlm.n_layers)
        exs = [u.examples[0] for u in units]
        imgs = [im[0] for im in images]
        if task == "classes":
            batch = vlm.prepare(imgs, [class_prompt(cfg)] * len(units))
            outs = vlm.forward_conditions(batch, conds, capture=Capture("last", layers=(vlm.n_layers,)))
            rows = [{"example_id": u.id, "label": e.label} for u, e in zip(units, exs)]
            arrays = {f"last:{c.name}": outs[c.name].residuals["last"][:, 0].numpy().astype(np.float16) for c in conds}
            return rows, arrays
        prompts = [vqa_prompt(cfg, e.question) for e in exs] if task == "vqa" else [caption_prompt(cfg)] * len(units)
        batch = vlm.prepare(imgs, prompts)
        gens = vlm.generate_conditions(batch, conds, max_new_tokens=int(cfg.get("max_new_tokens") or NEW_TOKENS[task]))
        rows = []
        for b, (u, e) in enumerate(zip(units, exs)):
            row = {"example_id": u.id}
            for c in conds:
                row[f"pred:{c.name}"] = vlm.decode(gens[c.name][b : b + 1], batch)[0].strip()
            rows.append(row)
        return rows, {}

    def aggregate(self, records, cfg, info):
        task = self._task(cfg)
        names = [c.name for c in conditions(cfg, info["n_layers"])]
        rows = []
        if task == "classes":
            labels = records.rows["label"].to_numpy()
            k = overlap_k(labels, cfg["k"])
            scores = {n: neighborhood_overlap(stack(records.arrays, f"last:{n}"), labels, k=k) for n in names}
            metric = "overlap@last"
        else:
            ids = records.rows["example_id"].tolist()
            wanted = set(ids)
            examples = {e.id: e for e in self.examples(cfg) if e.id in wanted}
            if task == "vqa":
                metric = "vqa_accuracy"
                scores = {
                    n: float(np.mean([vqa_accuracy(p, examples[i].answers) for i, p in zip(ids, records.rows[f"pred:{n}"])]))
                    for n in names
                }
            else:
                metric = "cider" if (cfg.get("cider_tokenize") or "ptb") == "ptb" else "cider (raw strings)"
                refs = {i: list(examples[i].references) for i in ids}
                tokenize = cfg.get("cider_tokenize") or "ptb"
                scores = {n: cider(dict(zip(ids, records.rows[f"pred:{n}"])), refs, tokenize=tokenize)[0] for n in names}
        base = scores["baseline"]
        for n in names:
            rows.append({"condition": n, "metric": metric, "score": float(scores[n]),
                         "relative": float(scores[n] / base) if base else float("nan"), "n": len(records.rows),
                         **({"k": k} if task == "classes" else {})})
        return {"ablation": pd.DataFrame(rows)}
