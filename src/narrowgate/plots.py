"""Figures of a run (the paper's Figures 1-5 for its models), drawn from the run's tables only.

Each experiment has one drawing function; `compare` overlays several runs on relative depth.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

OTHER = "other image tokens"  # cross_attention.OTHER (plots read tables only)
RESID = "residual index (0 = embeddings)"
COLORS = ["#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB", "#004488"]


def _depth(layer, n_layers: int):
    return layer / max(1, n_layers - 1)


def _save(fig, store, name: str) -> str:
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(store.figure_path(name, ext), dpi=120)
    plt.close(fig)
    return name


def modality_gap(tables, info, store):
    df = tables["modality_gap"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(df["resid"], df["median"], "-o", color=COLORS[0], ms=3, label=info["family"])
    a.fill_between(df["resid"], df["q25"], df["q75"], color=COLORS[0], alpha=0.25)
    a.set(xlabel=RESID, ylabel="cosine similarity (image vs text)", title="Modality gap")
    b.plot(df["resid"], df["homogeneity"], "-o", color=COLORS[1], ms=3)
    b.set(xlabel=RESID, ylabel="homogeneity (ADP clusters vs modality)", ylim=(-0.02, 1.02), title="Modality clusters")
    return [_save(fig, store, "modality_gap")]


def _token_order(token: str):
    """first_image, image[k] by k, last_image, then the rest by name."""
    if token == "first_image":
        return (0, 0, "")
    if token.startswith("image[") and token.endswith("]"):
        return (1, int(token[6:-1]), "")
    if token == "last_image":
        return (2, 0, "")
    return (3, 0, token)


def cross_attention(tables, info, store):
    df = tables["cross_attention_by_layer"]
    wide = df.pivot(index="layer", columns="token", values="fraction").fillna(0.0)
    middle = sorted((c for c in wide.columns if c not in ("eoi", OTHER)), key=_token_order)
    wide = wide[[c for c in ["eoi", *middle, OTHER] if c in wide.columns]]
    palette = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(9, 3.8))
    bottom = pd.Series(0.0, index=wide.index)
    for i, col in enumerate(wide.columns):
        color = {"eoi": "#BB5566", OTHER: "#DDDDDD"}.get(col, palette[i % len(palette)])
        ax.bar(wide.index, wide[col], bottom=bottom, color=color, label=col, width=0.85)
        bottom += wide[col]
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="layer", ylabel="share of text→image attention", ylim=(0, 1), title="Cross-modal attention")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return [_save(fig, store, "cross_attention")]


def _unablated(df):
    """The rows without a knockout (overlap tables also hold the ``--sweep`` windows)."""
    return df[df["knockout"] == "none"] if "knockout" in df else df


def overlap(tables, info, store):
    """Overlap per role; with knockout windows, a second panel: [EOI]'s overlap under each window."""
    df = tables["overlap"]
    windows = df[df["knockout"] != "none"] if "knockout" in df else df.iloc[:0]
    fig, axes = plt.subplots(1, 2 if len(windows) else 1, figsize=(12 if len(windows) else 7, 3.8), squeeze=False)
    ax = axes[0, 0]
    for i, (role, g) in enumerate(_unablated(df).groupby("role", sort=False)):
        ax.plot(g["resid"], g["overlap"], "-o", ms=3, color=COLORS[i % len(COLORS)], label=role)
    ax.set(xlabel=RESID, ylabel="neighbourhood overlap with labels", ylim=(-0.02, 1.02), title="Class information")
    ax.legend(fontsize=8)
    if len(windows):
        b = axes[0, 1]
        eoi = df[df["role"] == "eoi"]
        groups = list(eoi.groupby("knockout", sort=False))
        cmap = plt.get_cmap("viridis")
        for i, (name, g) in enumerate(groups):
            window = str(g["knockout_layers"].iloc[0])
            label = "no knockout" if name == "none" else f"image→eoi+text, layer{'s' * ('-' in window)} {window}"
            color = "k" if name == "none" else cmap(i / max(1, len(groups) - 1))
            b.plot(g["resid"], g["overlap"], "-", lw=1.2, color=color, label=label)
        b.set(xlabel=RESID, ylabel="overlap at [EOI]", ylim=(-0.02, 1.02), title="[EOI] under early-layer knockouts")
        handles, labels = b.get_legend_handles_labels()
        keep = sorted({0, len(labels) - 1} | set(range(0, len(labels), max(1, len(labels) // 8))))
        b.legend([handles[i] for i in keep], [labels[i] for i in keep], fontsize=7)
    for a in axes[0]:
        a.xaxis.get_major_locator().set_params(integer=True)
    return [_save(fig, store, "overlap")]


def ablation(tables, info, store):
    df = tables["ablation"]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(df)), 3.8))
    ax.bar(range(len(df)), df["relative"], color=[COLORS[i % len(COLORS)] for i in range(len(df))])
    ax.set_xticks(range(len(df)), df["condition"], rotation=45, ha="right", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set(ylabel=f"{df['metric'].iloc[0]} relative to baseline", title="Attention knockout")
    return [_save(fig, store, "ablation")]


def patching(tables, info, store):
    df = tables["patching"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(df["relative_depth"], df["similarity"], "-o", ms=3, color=COLORS[2], label="after patching")
    a.axhline(df["similarity_unpatched"].iloc[0], ls="--", color=COLORS[0], label="without patching")
    a.set(xlabel="relative depth of patched layer", ylabel="similarity to target distribution", ylim=(0, 1))
    a.legend(fontsize=8)
    b.plot(df["relative_depth"], df["accuracy"], "-o", ms=3, color=COLORS[1], label="after patching")
    b.axhline(df["accuracy_unpatched"].iloc[0], ls="--", color=COLORS[0], label="without patching")
    b.set(xlabel="relative depth of patched layer", ylabel="p(target) > p(base)", ylim=(-0.02, 1.02))
    b.legend(fontsize=8)
    return [_save(fig, store, "patching")]


def gate_scan(tables, info, store):
    """Per-position damage laid out on the image grid, the specials (BOI, [EOL]s, [EOI]) as bars beside it."""
    import numpy as np

    df = tables["positions"]
    grid = df[df["row"] >= 0]
    specials = df[df["row"] < 0].sort_values("rank").head(16)
    label = "estimated drop of log p(own next token)" if "attribution" in set(tables["gate"]["method"]) else \
        "damage: KL at last (nats)"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.2, 1]})
    if len(grid):
        cells = np.full((int(grid["row"].max()) + 1, int(grid["col"].max()) + 1), np.nan)
        cells[grid["row"].astype(int), grid["col"].astype(int)] = grid["damage"]
        im = a.imshow(cells, cmap="magma", aspect="auto" if cells.shape[0] == 1 else "equal")
        fig.colorbar(im, ax=a, fraction=0.046, label=label)
    a.set(title="image tokens on the image grid", xticks=[], yticks=[])
    gate = tables["gate"].iloc[0]
    b.barh(range(len(specials)), specials["damage"], color=COLORS[1])
    err = np.vstack([specials["damage"] - specials["damage_low"], specials["damage_high"] - specials["damage"]])
    b.errorbar(specials["damage"], range(len(specials)), xerr=np.clip(err, 0, None), fmt="none", ecolor="k", lw=0.8)
    b.set_yticks(range(len(specials)), specials["position"], fontsize=8)
    b.invert_yaxis()
    b.set(xlabel=label, title="special positions (95% bootstrap)")
    if "whole_damage" in gate and np.isfinite(gate.get("whole_damage", np.nan)):
        b.set_title(f"special positions (95% bootstrap)\nwhole image side knocked out: {gate['whole_damage']:.3g}",
                    fontsize=10)
    title = f"Gate scan — top: {gate['top_position']}"
    if "gate_index" in gate and np.isfinite(gate.get("gate_index", np.nan)):
        title += f", gate index {gate['gate_index']:.2f}"
    fig.suptitle(title)
    return [_save(fig, store, "gate_scan")]


DRAW = {
    "gate-scan": gate_scan,
    "modality-gap": modality_gap,
    "cross-attention": cross_attention,
    "overlap": overlap,
    "ablation": ablation,
    "patching": patching,
}


def draw(experiment: str, tables: dict, info: dict, store) -> list[str]:
    """Draw the figures of one run; returns their names (files under figures/)."""
    needed = {"modality-gap": "modality_gap", "cross-attention": "cross_attention_by_layer", "overlap": "overlap",
              "ablation": "ablation", "patching": "patching", "gate-scan": "positions"}.get(experiment)
    if needed is None or needed not in tables or tables[needed].empty:
        return []
    return DRAW[experiment](tables, info, store)


#: For `compare`: per experiment, the table, the y column and an optional grouping column.
CURVES = {
    "modality-gap": ("modality_gap", "median", None),
    "overlap": ("overlap", "overlap", "role"),
    "patching": ("patching", "similarity", None),
    "cross-attention": ("cross_attention_roles", "fraction", "role"),
}


def compare(runs: list[tuple[str, dict, dict]], out_dir) -> list[str]:
    """Overlay runs (label, tables, model info) of one experiment on relative depth; returns file paths."""
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    experiment = runs[0][2]["experiment"]
    if experiment == "ablation":
        frames = [t["ablation"].assign(model=label) for label, t, _ in runs]
        df = pd.concat(frames)
        wide = df.pivot(index="condition", columns="model", values="relative")
        ax = wide.plot.bar(figsize=(8, 4), color=COLORS[: len(runs)])
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set(ylabel="score relative to baseline", title="Attention knockout")
        fig = ax.get_figure()
    else:
        table, col, group = CURVES[experiment]
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (label, t, info) in enumerate(runs):
            df = _unablated(t[table])
            n = info["model"]["n_layers"] + (1 if experiment in ("overlap", "modality-gap") else 0)
            groups = df.groupby(group, sort=False) if group else [(None, df)]
            for j, (g, sub) in enumerate(groups):
                name = label if g is None else f"{label}: {g}"
                # One colour per run without groups; with groups, colour = group and line style = run.
                color = COLORS[(i if g is None else j) % len(COLORS)]
                style = "-" if g is None else ("-", "--", ":", "-.")[i % 4]
                x = sub["resid"] if "resid" in sub else sub["layer"]
                ax.plot(_depth(x, n), sub[col], style, marker="o", ms=2, color=color, label=name)
        ax.set(xlabel="relative depth", ylabel=col, title=experiment)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        path = out_dir / f"compare-{experiment}.{ext}"
        fig.savefig(path, dpi=120)
        paths.append(str(path))
    plt.close(fig)
    return paths
