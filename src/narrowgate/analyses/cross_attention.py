"""Sec. 4.2, Eq. 1: how the text's attention to the image splits over image positions, layer by layer.

ImageNet prompt "<image> This animal is a". Every pre-text position's share is recorded per
example; the aggregate singles out the positions whose mean share exceeds ``threshold`` (1%) and
twice the uniform share at some layer (at most ``max_tokens``, largest first) and sums the rest as
``rest`` (`narrowgate.roles.REST`; the paper's "internal image"). Positions are named by their
single-position roles (``image[k]`` with ``first_image`` and ``last_image`` for the ends, ``eol[i]``,
``image_special[i]``, ``eoi``); rows are decoder layers (``layer``). Role totals (``eoi``,
``first_image``, ``last_image``, ``internal_image``, ``eol``, ``image_special``) are reported too. Shares are normalised per example, then averaged
(the paper's Eq. 1 read per example); ``--normalise after-mean`` averages the raw attention c_l(j)
over examples and normalises the mean, as the authors' code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from ..data.prompts import class_prompt
from ..engine.shared import Condition
from ..engine.stats import CrossModalAttention
from ..roles import REST, parse_role
from .base import Experiment, Unit, register
from .options import ClassPrompt, RunConfig, option

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..store import RunStore, Shard
    from ..vlm import VLM

#: The role totals of table ``cross_attention_roles``.
ROLE_TOTALS = ("eoi", "first_image", "last_image", "internal_image", "eol", "image_special")


def role_of(name: str, n_content: int) -> str:
    """The role total a position name counts towards (``image[k]``: first, last or internal image)."""
    r = parse_role(name)
    if r.name != "image":
        return r.name
    return "first_image" if r.index == 0 else "last_image" if r.index == n_content - 1 else "internal_image"


def single_out(means: dict, threshold: float, n_content: Any, max_tokens: int) -> list[str]:
    """Positions shown on their own: mean share above ``threshold`` *and* above twice the uniform share
    (1 / image length) at some layer, at most ``max_tokens`` of them (largest first), so the figure stays
    readable at any image length. With the paper's 1,024-token images the uniform share is 0.1% and the
    1% rule alone decides."""
    uniform = 1.0 / max(1, int(np.min(n_content)))
    bar = max(threshold, 2 * uniform)
    above = [(float(v.max()), k) for k, v in means.items() if k != "eoi" and float(v.max()) > bar]
    return sorted((k for _, k in sorted(above, reverse=True)[:max_tokens]))


@dataclass
class CrossAttentionConfig(ClassPrompt, RunConfig):
    """Settings of ``narrowgate run cross-attention``."""

    n_per_class: int | None = option(100, "Images per class (the paper: 100).", min=1)
    threshold: float = option(
        0.01, "Share above which a position is shown on its own (the paper: 1%).", parse="finite", min=0.0, max=1.0
    )
    max_tokens: int = option(9, "Most positions shown on their own (the legend stays readable).", min=1)
    normalise: str = option(
        "per-example",
        "per-example (shares averaged) or after-mean (the authors': raw attention averaged, then normalised).",
        choices=("per-example", "after-mean"),
    )


@register
class CrossAttention(Experiment[CrossAttentionConfig]):
    """How the text's attention to the image splits over image positions (Sec. 4.2, Eq. 1)."""

    name = "cross-attention"
    task = "classes"
    prompts = ("class",)
    config = CrossAttentionConfig
    curve = ("cross_attention_roles", "fraction", None)

    def process(
        self, vlm: VLM, units: list[Unit], images: list[tuple], cfg: CrossAttentionConfig
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per example, every pre-text position's share (and raw mass) of the text's attention, per layer."""
        batch = vlm.prepare([im[0] for im in images], [class_prompt(cfg.prompt, cfg.data)] * len(units))
        out = vlm.forward_conditions(batch, [Condition("baseline")], attention_stats=True)["baseline"]
        cma = cast(CrossModalAttention, out.cross_modal_attention)
        rows = []
        for b, unit in enumerate(units):
            n = len(cma.labels[b])
            frac = cma.fractions[b, :, :n].numpy().astype(np.float32)
            mass = cma.mass[b, :, :n].numpy().astype(np.float32)
            rows.append(
                {
                    "example_id": unit.id,
                    "label": unit.examples[0].label,
                    "n_content": len(batch.layouts[b].content),
                    "positions": cma.labels[b],
                    "fractions": frac.reshape(-1).tolist(),
                    "mass": mass.reshape(-1).tolist(),
                }
            )
        return rows, {}

    def aggregate(self, records: Shard, cfg: CrossAttentionConfig, info: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """Tables ``cross_attention_by_layer`` ([EOI], the singled-out positions and the rest), ``_roles`` (the role
        totals) and ``_top_positions``."""
        L = info["n_layers"]
        column = "mass" if cfg.normalise == "after-mean" else "fractions"
        sums: dict[str, np.ndarray] = {}
        totals = {r: np.zeros(L) for r in ROLE_TOTALS}
        for _, row in records.rows.iterrows():
            frac = np.asarray(row[column], dtype=np.float64).reshape(L, -1)
            n_content = int(row["n_content"])
            ends = {"image[0]": "first_image", f"image[{n_content - 1}]": "last_image"}
            for j, label in enumerate(row["positions"]):
                name = ends.get(label, label)
                sums[name] = sums.get(name, 0.0) + frac[:, j]
                totals[role_of(label, n_content)] += frac[:, j]
        n = len(records.rows)
        means = {k: v / n for k, v in sums.items()}
        totals = {k: v / n for k, v in totals.items()}
        if column == "mass":
            norm = np.maximum(sum(means.values()), np.finfo(np.float64).tiny)
            means = {k: v / norm for k, v in means.items()}
            totals = {k: v / norm for k, v in totals.items()}
        singled = single_out(means, cfg.threshold, records.rows["n_content"], cfg.max_tokens)
        shown = ["eoi"] + singled
        by_layer = []
        for layer in range(L):
            rest = 1.0 - sum(means[k][layer] for k in shown if k in means)
            for k in shown:
                by_layer.append({"layer": layer, "role": k, "fraction": float(means.get(k, np.zeros(L))[layer])})
            by_layer.append({"layer": layer, "role": REST, "fraction": float(rest)})
        role_rows = [{"layer": l, "role": r, "fraction": float(v[l])} for r, v in totals.items() for l in range(L)]
        top = sorted(means.items(), key=lambda kv: -float(kv[1].mean()))[:20]
        return {
            "cross_attention_by_layer": pd.DataFrame(by_layer),
            "cross_attention_roles": pd.DataFrame(role_rows),
            "cross_attention_top_positions": pd.DataFrame(
                [{"role": k, "mean_fraction": float(v.mean()), "max_fraction": float(v.max())} for k, v in top]
            ),
        }

    def compare(self, runs: list[tuple[str, dict, dict]]) -> Figure:
        """[EOI]'s share of the text's attention to the image, one line per run."""
        from ..plots import overlay_curves

        return overlay_curves(
            runs,
            "cross_attention_roles",
            "fraction",
            None,
            "share of text→image attention at [EOI]",
            rows=lambda df: df[df["role"] == "eoi"],
        )

    def figures(
        self, tables: dict[str, pd.DataFrame], info: dict[str, Any], store: RunStore, cfg: CrossAttentionConfig
    ) -> list[str]:
        """Fig. 3: per decoder layer, the stacked shares of [EOI], the singled-out positions and the rest."""
        from ..plots import has, plt, save

        if not has(tables, "cross_attention_by_layer"):
            return []
        df = tables["cross_attention_by_layer"]
        wide = df.pivot(index="layer", columns="role", values="fraction").fillna(0.0)
        middle = sorted((c for c in wide.columns if c not in ("eoi", REST)), key=_token_order)
        wide = wide[[c for c in ["eoi", *middle, REST] if c in wide.columns]]
        palette = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]  # a ListedColormap; stubs say Colormap
        fig, ax = plt.subplots(figsize=(9, 3.8))
        bottom = pd.Series(0.0, index=wide.index)
        for i, col in enumerate(wide.columns):
            color = {"eoi": "#BB5566", REST: "#DDDDDD"}.get(col, palette[i % len(palette)])
            label = "rest of the image" if col == REST else col
            ax.bar(wide.index, wide[col], bottom=bottom, color=color, label=label, width=0.85)
            bottom += wide[col]
        ax.xaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]  # MaxNLocator; stubs: Locator
        ax.set(
            xlabel="decoder layer", ylabel="share of text→image attention", ylim=(0, 1), title="Cross-modal attention"
        )
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        return [save(fig, store, "cross_attention")]


def _token_order(token: str) -> tuple[int, int, str]:
    """first_image, image[k] by k, last_image, then the rest by name."""
    if token == "first_image":
        return (0, 0, "")
    if token.startswith("image[") and token.endswith("]"):
        return (1, int(token[6:-1]), "")
    if token == "last_image":
        return (2, 0, "")
    return (3, 0, token)
