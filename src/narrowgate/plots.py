"""What every figure shares: the palette, the residual-index label, saving, and ``narrowgate compare``.

Each experiment draws its own figures (its ``figures`` method, in its own file) from its tables only;
`write_compare` writes an experiment's overlay of several runs on relative depth.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

    from matplotlib.figure import Figure

RESID = "residual index (0 = embeddings)"
PAPER_LAYER = "layer l (output of decoder layer l = resid l+1; the paper's axis)"
DEPTH = "relative depth (resid / L; decoder layer l at l / L)"
COLORS = ["#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB", "#004488"]


def _write(fig, path, ext: str) -> None:
    """``fig`` as ``path`` in format ``ext``, whole or not at all (a full disk leaves no truncated file)."""
    from .fileio import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=ext))


def save(fig, store, name: str) -> str:
    """Write ``fig`` as figures/<name>.png and .pdf of the run; returns ``name``."""
    fig.tight_layout()
    try:
        for ext in ("png", "pdf"):
            _write(fig, store.figure_path(name, ext), ext)
    finally:
        plt.close(fig)
    return name


def has(tables: dict, name: str) -> bool:
    """Whether the run produced a non-empty table ``name`` (a figure needs one)."""
    return name in tables and not tables[name].empty


def depth_axis(df: pd.DataFrame, n_layers: int) -> pd.Series:
    """Relative depth of a table's rows, one convention everywhere: ``resid`` / L (0 = embeddings, 1 = the last
    layer's output), and a decoder ``layer`` l at l / L, the residual it reads."""
    return (df["resid"] if "resid" in df else df["layer"]) / max(1, n_layers)


def resid_axis(df: pd.DataFrame, axis: str = "paper") -> tuple[pd.DataFrame, pd.Series, str]:
    """Rows, x values and label of a per-``resid`` curve: the paper's layer axis (the layer outputs, layer l =
    resid l+1; the embeddings are not drawn) unless the run's ``axis`` setting is ``resid`` (0..L)."""
    if axis == "paper":
        rows = df[df["resid"] >= 1]
        return rows, rows["resid"] - 1, PAPER_LAYER
    return df, df["resid"], RESID


def write_compare(fig: Figure | None, name: str, out_dir: str | Path) -> list[str]:
    """Write an overlay of runs of experiment ``name`` (its `Experiment.compare` figure, or None: nothing to draw)
    as ``compare-<name>.png`` and ``.pdf`` under ``out_dir``; returns the file paths.

    The caller makes the figure, so plotting never imports the experiments (the layers run the other way)."""
    if fig is None:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = []
    try:
        for ext in ("png", "pdf"):
            path = out_dir / f"compare-{name}.{ext}"
            _write(fig, path, ext)
            paths.append(str(path))
    finally:
        plt.close(fig)
    return paths


def overlay_curves(
    runs: list[tuple[str, dict, dict]],
    table: str,
    col: str,
    group: str | None,
    title: str,
    rows: Callable[[pd.DataFrame], pd.DataFrame] = lambda df: df,
) -> Figure:
    """One line per run (per run and group): ``col`` of ``table`` on relative depth."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, tables, manifest) in enumerate(runs):
        df = rows(tables[table])
        groups = df.groupby(group, sort=False) if group else [(None, df)]
        for j, (g, sub) in enumerate(groups):
            name = label if g is None else f"{label}: {g}"
            # One colour per run without groups; with groups, colour = group and line style = run.
            color = COLORS[(i if g is None else j) % len(COLORS)]
            style = "-" if g is None else ("-", "--", ":", "-.")[i % 4]
            x = depth_axis(sub, manifest["model"]["n_layers"])
            ax.plot(x, sub[col], style, marker="o", ms=2, color=color, label=name)
    ax.set(xlabel=DEPTH, ylabel=col, title=title)
    ax.legend(fontsize=7)
    return fig
