"""New (not in the paper): patch [EOI] and read what the model then *says* about the image, in generated text.

The paper's steering evidence is Fig. 5, the next-token distribution after patching (``narrowgate run
patching``). This experiment is narrowgate's own generated-text counterpart. Pairs and images as in
``patching`` (base <- target, ``--direction``, ``--n-per-class``). Each base image generates a completion of
the class prompt (``--max-new-tokens``, 10) unpatched, and with the target image's [EOI] residual patched
in at every residual index of a window (``--resids``, default relative depth 0.25-0.5 on resid / L); with
``--sweep`` also at each residual index alone. Reported: how often the text names the target, the base,
and the target but not the base, with and without the edit, per pair, and example texts. A class is
named when its name — or one of its ``--synonyms`` — appears as whole words, case-insensitively
("owl" is not named by "bowl").
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..data.prompts import class_prompt
from ..engine.interventions import Capture, Patch
from ..engine.shared import Condition
from ..errors import DataError
from .base import PairedExperiment, Sample, Unit, register
from .options import PairsConfig, option, parse_layers

if TYPE_CHECKING:
    from ..store import RunStore, Shard
    from ..vlm import VLM

#: Rates reported for each text: names the target, the base, the target and not the base.
FLAGS = ("target", "base", "target_not_base")


@dataclass
class SteeringConfig(PairsConfig):
    """Settings of ``narrowgate run steering``."""

    resids: str | None = option(
        None, "Residual indices patched together, e.g. 8-16 (default: relative depth 0.25-0.5).", parse="layers"
    )
    sweep: bool = option(False, "Also patch each residual index alone (every index, or each of --resids).")
    max_new_tokens: int = option(10, "New tokens of each completion.", min=1)
    synonyms: str | None = option(
        None,
        'JSON file of other names per class, e.g. {"great grey owl": ["owl"], "Siberian husky": ["husky"]} '
        "(keys: class names or labels).",
        parse="nonempty",
    )


def window(cfg: SteeringConfig, n_layers: int) -> tuple[int, ...]:
    """The patched residual indices: ``--resids`` or relative depth 0.25-0.5 (relative depth = resid / L)."""
    given = parse_layers(cfg.resids, n_layers + 1, option="--resids")
    if given is not None:
        return given
    lo, hi = round(0.25 * n_layers), round(0.5 * n_layers)
    return tuple(range(lo, hi + 1))


def sweep_sites(cfg: SteeringConfig, n_layers: int) -> tuple[int, ...]:
    """The residual indices patched one at a time with ``--sweep``: each of ``--resids``, else 0..L-1."""
    given = parse_layers(cfg.resids, n_layers + 1, option="--resids")
    return given if given is not None else tuple(range(n_layers))


def load_synonyms(path: str | None) -> dict[str, list[str]]:
    """``--synonyms``: a JSON object of class name or label -> other names (keys lower-cased); {} without one."""
    if not path:
        return {}
    file = Path(path).expanduser()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"--synonyms {file} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--synonyms {file} is not readable JSON ({e}).") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v)
        for k, v in data.items()
    ):
        raise DataError(
            f'--synonyms {file} must be a JSON object of name -> list of names, e.g. {{"great grey owl": ["owl"]}}.'
        )
    return {k.strip().lower(): [x.strip() for x in v] for k, v in data.items()}


def class_names(word: str, label: str, synonyms: dict[str, list[str]]) -> list[str]:
    """A class's name and its synonyms (looked up by name and by label), without repeats."""
    out = [word, *synonyms.get(word.lower(), []), *synonyms.get(str(label).lower(), [])]
    return list(dict.fromkeys(out))


def names(text: str, candidates: str | Sequence[str]) -> bool:
    """Whether ``text`` names any of ``candidates`` as whole words (case-insensitive; spaces or hyphens between
    the words of a multi-word name). One string is one candidate."""
    for name in [candidates] if isinstance(candidates, str) else candidates:
        words = name.split()
        if not words:
            continue
        pattern = r"(?<!\w)" + r"[\s\-]+".join(re.escape(w) for w in words) + r"(?!\w)"
        if re.search(pattern, text, flags=re.IGNORECASE):
            return True
    return False


def _flags(text: str, target_names: Sequence[str], base_names: Sequence[str]) -> dict[str, bool]:
    t, b = names(text, target_names), names(text, base_names)
    return {"target": t, "base": b, "target_not_base": t and not b}


@register
class Steering(PairedExperiment[SteeringConfig]):
    """Patch [EOI] and read what the model then says about the image, in generated text."""

    name = "steering"
    config = SteeringConfig

    def check(self, examples: Sample, cfg: SteeringConfig) -> None:
        """Refuse an unreadable ``--synonyms`` file before the model loads."""
        load_synonyms(cfg.synonyms)

    def check_model(self, cfg: SteeringConfig, n_layers: int) -> None:
        """Refuse ``--resids`` outside the model's residual indices."""
        window(cfg, n_layers)

    def process(
        self, vlm: VLM, units: list[Unit], images: list[tuple], cfg: SteeringConfig
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per pair, the base image's completion unpatched, steered (the window patched) and, with ``--sweep``,
        patched at each residual index alone, with the names each is matched against."""
        prompt = class_prompt(cfg.prompt, cfg.data)
        synonyms = load_synonyms(cfg.synonyms)
        base = vlm.prepare([im[0] for im in images], [prompt] * len(units))
        target = vlm.prepare([im[1] for im in images], [prompt] * len(units))
        donor = vlm.forward_conditions(target, [Condition("baseline")], capture=Capture("eoi"))["baseline"].residuals[
            "eoi"
        ]
        sites = window(cfg, vlm.n_layers)
        singles = sweep_sites(cfg, vlm.n_layers) if cfg.sweep else ()
        conds = [
            Condition("baseline"),
            Condition("steered", patches=tuple(Patch("eoi", l, donor[:, l]) for l in sites)),
            *(Condition(f"resid {l}", patches=(Patch("eoi", l, donor[:, l]),)) for l in singles),
        ]
        gens = vlm.generate_conditions(base, conds, max_new_tokens=int(cfg.max_new_tokens))
        texts = {c.name: [t.strip() for t in vlm.decode(gens[c.name], base)] for c in conds}
        rows = []
        for b, u in enumerate(units):
            eb, et = u.examples
            row = {
                "example_id": u.id,
                "pair": f"{eb.label}<-{et.label}",
                "base": eb.word,
                "target": et.word,
                "base_image": eb.id,
                "target_image": et.id,
                "base_names": class_names(eb.word, eb.label, synonyms),
                "target_names": class_names(et.word, et.label, synonyms),
                "resids": f"{sites[0]}-{sites[-1]}",
                "text_unpatched": texts["baseline"][b],
                "text_steered": texts["steered"][b],
            }
            if singles:
                row["sweep_resids"] = list(singles)
                row["text_sweep"] = [texts[f"resid {l}"][b] for l in singles]
            rows.append(row)
        return rows, {}

    def figures(
        self, tables: dict[str, pd.DataFrame], info: dict[str, Any], store: RunStore, cfg: SteeringConfig
    ) -> list[str]:
        """With ``--sweep``: how often the text names the target (and not the base) per patched residual index."""
        from ..plots import COLORS, has, plt, save

        if not has(tables, "steering_sweep"):
            return []
        df = tables["steering_sweep"]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for i, flag in enumerate(FLAGS):
            ax.plot(df["relative_depth"], df[f"names_{flag}"], "-o", ms=3, color=COLORS[i], label=f"names {flag}")
            ax.axhline(df[f"names_{flag}_unpatched"].iloc[0], ls="--", lw=0.8, color=COLORS[i])
        ax.set(
            xlabel="relative depth of the patched residual (resid / L)",
            ylabel="share of completions",
            ylim=(-0.02, 1.02),
            title="[EOI] patched at one residual index (dashed: unpatched)",
        )
        ax.legend(fontsize=8)
        return [save(fig, store, "steering_sweep")]

    def aggregate(self, records: Shard, cfg: SteeringConfig, info: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """Tables ``steering`` (how often the text names the target, the base, the target only, before and after),
        ``steering_pairs``, ``steering_examples`` and, with ``--sweep``, ``steering_sweep``."""
        df = records.rows
        tnames = [_names_of(r, "target") for _, r in df.iterrows()]
        bnames = [_names_of(r, "base") for _, r in df.iterrows()]
        rows = []
        for i, (t, b) in enumerate(zip(tnames, bnames)):
            before = _flags(df["text_unpatched"].iloc[i], t, b)
            after = _flags(df["text_steered"].iloc[i], t, b)
            rows.append(
                {"pair": df["pair"].iloc[i]}
                | {f"{k}_unpatched": v for k, v in before.items()}
                | {f"{k}_steered": v for k, v in after.items()}
            )
        flags = pd.DataFrame(rows)
        per_pair = flags.groupby("pair", sort=False).mean().reset_index()
        per_pair = df.drop_duplicates("pair")[["pair", "base", "target"]].merge(per_pair, on="pair")
        per_pair["n"] = df.groupby("pair", sort=False).size().to_numpy()
        total = flags.drop(columns="pair").mean().to_dict()
        summary = pd.DataFrame(
            [
                {
                    "resids": df["resids"].iloc[0],
                    "direction": cfg.direction,
                    **{f"names_{k}": float(v) for k, v in total.items()},
                    "n": len(df),
                }
            ]
        )
        examples = df.groupby("pair", sort=False).head(2)[["pair", "base", "target", "text_unpatched", "text_steered"]]
        tables = {
            "steering": summary,
            "steering_pairs": per_pair,
            "steering_examples": examples.reset_index(drop=True),
        }
        if "text_sweep" in df:
            tables["steering_sweep"] = _sweep_table(df, tnames, bnames, total, info["n_layers"])
        return tables


def _names_of(row: pd.Series, who: str) -> list[str]:
    """The names a record was matched against (recorded with it), or the class word of older records."""
    got = row.get(f"{who}_names")
    return [row[who]] if got is None or (isinstance(got, float) and pd.isna(got)) else [str(x) for x in got]


def _sweep_table(
    df: pd.DataFrame, tnames: list[list[str]], bnames: list[list[str]], total: dict, n_layers: int
) -> pd.DataFrame:
    """Per residual index patched alone: the share of completions naming the target, the base, the target only."""
    sites = [int(x) for x in df["sweep_resids"].iloc[0]]
    rows = []
    for j, resid in enumerate(sites):
        hits = [_flags(texts[j], t, b) for texts, t, b in zip(df["text_sweep"], tnames, bnames)]
        rows.append(
            {
                "resid": resid,
                "relative_depth": resid / max(1, n_layers),
                **{f"names_{k}": float(sum(h[k] for h in hits) / len(hits)) for k in FLAGS},
                **{f"names_{k}_unpatched": float(total[f"{k}_unpatched"]) for k in FLAGS},
                "n": len(hits),
            }
        )
    return pd.DataFrame(rows)
