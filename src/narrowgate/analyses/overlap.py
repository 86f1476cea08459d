"""Sec. 4.2, Eq. 2: how much ImageNet class information the residual stream holds at each role, per layer.

Residuals are captured at ``eoi``, ``first_image`` (the role Chameleon-34B's figure singles out),
``last_image``, ``image[k]`` (the paper's "32nd image token": sequence position 32 of the authors' code,
content index k = 30; the last but one when the image is shorter), the mean over ``internal_image``
tokens, the mean over ``eol`` tokens when the family has them (Pixtral's [IMG_BREAK]s, SM Fig. 2), and
``last``; the neighbourhood overlap with the class labels (k = 30) is computed per residual index
``resid`` 0..L (0 = embeddings; ``--outputs-only`` captures 1..L only). The figure draws the paper's
axis, layer l = resid l+1 (``--axis resid``: every residual index).

With ``--sweep`` the same captures are also taken under growing early-layer knockout windows, decoder
layers 0..w-1 for w = step, 2 step, ..., L (``--sweep-step``, the authors' 4), for three knockouts:

- ``eoi -> eoi+text``: the authors' [EOI] ablation ([EOI] -> every position, itself included; earlier
  positions cannot attend to it anyway);
- ``image -> text``: the authors' image -> text ablation (image tokens -> the text, [EOI] left reading
  the image);
- ``image -> eoi+text``: the image blocked from [EOI] and the text alike (narrowgate's own, named for what
  it is).

Table ``overlap_sweep`` is the authors' overlap-with-ablation: per knockout and window, the neighbourhood
overlap of ``last`` after the last layer (resid L); table ``overlap`` holds every role at every index
under every window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pandas as pd

from ..data import ClassExample
from ..data.prompts import class_prompt
from ..engine.interventions import Capture, Knockout
from ..engine.shared import Condition
from ..metrics import neighborhood_overlap_per_layer
from ..metrics.overlap import check_k, overlap_k
from ..store import BFloat16
from .base import Experiment, Sample, Unit, register, stack
from .options import MODES, ClassPrompt, PaperAxis, RunConfig, check_sweep, option, sweep_step

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..batch import Batch
    from ..store import RunStore, Shard
    from ..vlm import VLM

ROLES = ("eoi", "first_image", "last_image", "internal_image", "last")
#: Captured only when every example has the role (families with in-image line breaks).
OPTIONAL_ROLES = ("eol",)
NO_KNOCKOUT = "none"


def image_index(batch: Batch, wanted: int) -> int:
    """``wanted`` if every example has that many content tokens, else the last but one."""
    shortest = min(len(lay.content) for lay in batch.layouts)
    return min(wanted, shortest - 2)


def windows(cfg: OverlapConfig, n_layers: int) -> list[tuple[int, ...]]:
    """Growing early-layer windows 0..w-1 (``--sweep``, step ``--sweep-step``); the last one is every layer."""
    if not cfg.sweep:
        return []
    step = sweep_step(cfg, n_layers)
    ends = list(range(step, n_layers + 1, step))
    if not ends or ends[-1] != n_layers:
        ends.append(n_layers)
    return [tuple(range(w)) for w in ends]


#: The knockouts of ``--sweep``: (sources, targets), each over the growing windows.
SWEEPS = (("eoi", ("eoi", "text")), ("image", ("text",)), ("image", ("eoi", "text")))


def sweep_name(sources: str | tuple, targets: str | tuple) -> str:
    """The knockout's name without its layers and mode (``eoi->eoi+text``): the ``sweep`` column."""
    return Knockout(sources, targets).name


def conditions(cfg: OverlapConfig, n_layers: int) -> list[Condition]:
    """The baseline plus each knockout of `SWEEPS` in each window of `windows`."""
    out = [Condition(NO_KNOCKOUT)]
    for sources, targets in SWEEPS:
        for layers in windows(cfg, n_layers):
            ko = Knockout(sources, targets, layers=layers, mode=cfg.mode)
            out.append(Condition(ko.name, knockouts=(ko,)))
    return out


@dataclass
class OverlapConfig(PaperAxis, ClassPrompt, RunConfig):
    """Settings of ``narrowgate run overlap``."""

    n_per_class: int | None = option(100, "Images per class (the paper: 100).", min=1)
    k: int = option(30, "Neighbours of the neighbourhood overlap (the paper: 30).", min=1)
    image_index: int = option(
        30, "The k of image[k]: the paper's '32nd image token' (sequence position 32 = content index 30).", min=0
    )
    outputs_only: bool = option(False, "Capture the layer outputs only (resid 1..L), not the embeddings.")
    sweep: bool = option(
        False,
        "Also under growing early-layer windows 0..w-1 of eoi->eoi+text and image->text knocked out "
        "(the authors' overlap-with-ablation) and of image->eoi+text.",
    )
    sweep_step: int = option(4, "Window growth per step with --sweep (the authors: 4).", min=1)
    mode: str = option("zero", "Knockout mode of --sweep: zero (the paper's) or mask.", choices=MODES)


@register
class Overlap(Experiment[OverlapConfig]):
    """Class information in the residual stream at each role, per layer (Sec. 4.2, Eq. 2)."""

    name = "overlap"
    task = "classes"
    prompts = ("class",)
    config = OverlapConfig
    curve = ("overlap", "overlap", None)

    def check(self, examples: Sample, cfg: OverlapConfig) -> None:
        """Refuse ``--sweep-step`` without ``--sweep`` and a ``k`` the classes cannot support."""
        check_sweep(cfg, self.defaults["sweep_step"])
        check_k((cast(ClassExample, e).label for e in examples), cfg.k)

    def check_model(self, cfg: OverlapConfig, n_layers: int) -> None:
        """Refuse a ``--sweep-step`` larger than the model's depth."""
        windows(cfg, n_layers)

    def process(
        self, vlm: VLM, units: list[Unit], images: list[tuple], cfg: OverlapConfig
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per example, the residuals of every role at every captured index, under each condition."""
        batch = vlm.prepare([im[0] for im in images], [class_prompt(cfg.prompt, cfg.data)] * len(units))
        k = image_index(batch, cfg.image_index)
        roles = ROLES + tuple(r for r in OPTIONAL_ROLES if all(len(p) for p in batch.positions(r)))
        first = 1 if cfg.outputs_only else 0
        capture = Capture(roles + (f"image[{k}]",), resids=tuple(range(first, vlm.n_layers + 1)))
        conds = conditions(cfg, vlm.n_layers)
        outs = vlm.forward_conditions(batch, conds, capture=capture)
        rows = [{"example_id": u.id, "label": u.examples[0].label, "image_index": k} for u in units]
        arrays: dict[str, Any] = {}
        for i, cond in enumerate(conds):
            res = outs[cond.name].residuals
            for role in roles:
                arrays[f"{i}:{role}"] = BFloat16(res[role].numpy(), capture.resids)
            arrays[f"{i}:image_k"] = BFloat16(res[f"image[{k}]"].numpy(), capture.resids)
        return rows, arrays

    def aggregate(self, records: Shard, cfg: OverlapConfig, info: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """Table ``overlap`` (every role, residual index and knockout window) and, with ``--sweep``,
        ``overlap_sweep``."""
        labels = records.rows["label"].to_numpy()
        k_used = int(records.rows["image_index"].min())
        k = overlap_k(labels, cfg.k)
        first = 1 if cfg.outputs_only else 0
        rows = []
        for i, cond in enumerate(conditions(cfg, info["n_layers"])):
            ko = cond.knockouts[0] if cond.knockouts else None
            layers = [int(l) for l in ko.layers] if ko and ko.layers is not None else []
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
                        "sweep": sweep_name(ko.sources, ko.targets) if ko else NO_KNOCKOUT,
                        "knockout_layers": window,
                        "layers_knocked_out": len(layers),
                        "resid": first + j,
                        "role": name,
                        "overlap": float(v),
                        "k": k,
                    }
                    for j, v in enumerate(values)
                ]
        table = pd.DataFrame(rows)
        tables = {"overlap": table}
        if cfg.sweep:
            tables["overlap_sweep"] = sweep_table(table, info["n_layers"])
        return tables

    def compare(self, runs: list[tuple[str, dict, dict]]) -> Figure:
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

    def figures(
        self, tables: dict[str, pd.DataFrame], info: dict[str, Any], store: RunStore, cfg: OverlapConfig
    ) -> list[str]:
        """Overlap per role; with ``--sweep``, a second panel: the overlap of ``last`` after the last layer against
        the number of early layers knocked out, one line per knockout (the authors' overlap-with-ablation)."""
        from ..plots import COLORS, has, plt, resid_axis, save

        if not has(tables, "overlap"):
            return []
        df = tables["overlap"]
        sweep = tables.get("overlap_sweep")
        swept = sweep if sweep is not None and len(sweep) else None
        fig, axes = plt.subplots(1, 1 if swept is None else 2, figsize=(7 if swept is None else 12, 3.8), squeeze=False)
        ax = axes[0, 0]
        rows, x, label = resid_axis(_unablated(df), cfg.axis)
        for i, (role, g) in enumerate(rows.groupby("role", sort=False)):
            ax.plot(x.loc[g.index], g["overlap"], "-o", ms=3, color=COLORS[i % len(COLORS)], label=role)
        ax.set(xlabel=label, ylabel="neighbourhood overlap with labels", ylim=(-0.02, 1.02), title="Class information")
        ax.legend(fontsize=8)
        if swept is not None:
            b = axes[0, 1]
            for i, (name, g) in enumerate(swept.groupby("sweep", sort=False)):
                b.plot(g["layers_knocked_out"], g["overlap"], "-o", ms=3, color=COLORS[i % len(COLORS)], label=name)
            b.set(
                xlabel="early layers knocked out (0..w-1)",
                ylabel="overlap of last after the last layer",
                ylim=(-0.02, 1.02),
                title="Overlap with early-layer knockouts",
            )
            b.legend(fontsize=8)
        for a in axes[0]:
            a.xaxis.get_major_locator().set_params(integer=True)
        return [save(fig, store, "overlap")]


def sweep_table(table: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """Per ``--sweep`` knockout and window w (w = 0: none), the overlap of ``last`` after the last layer."""
    last = table[(table["role"] == "last") & (table["resid"] == n_layers)]
    base = last[last["knockout"] == NO_KNOCKOUT]
    parts = []
    for name in dict.fromkeys(last.loc[last["knockout"] != NO_KNOCKOUT, "sweep"]):
        parts += [base.assign(sweep=name), last[last["sweep"] == name]]
    cols = ["sweep", "knockout", "layers_knocked_out", "knockout_layers", "overlap", "k"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def _unablated(df: pd.DataFrame) -> pd.DataFrame:
    """The rows without a knockout (the table also holds the ``--sweep`` windows)."""
    return df[df["knockout"] == NO_KNOCKOUT]
