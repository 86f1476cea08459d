"""``narrowgate demo``: every experiment on several models (by default the shipped organisms), one report.

By default: native, non-native and gated, plus the gated organism after the remove-gate fine-tuning in
miniature (`remove_gate`), so the report shows an emergent-gate-free pair, a planted gate, and its removal.

Each experiment runs through the same runner as ``narrowgate run`` (so every sub-run is a normal,
resumable run directory under ``OUT/<model>/``); the demo then writes ``OUT/report.html`` placing the
models side by side and prints the ablation summary. The verdict is computed from the measured
numbers only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from . import report
from .analyses import EXPERIMENTS
from .errors import BaselineAtChance
from .loading import load
from .plots import write_compare
from .progress import eta
from .runner import run
from .store import RunStore

#: (run name, experiment, settings) — sample sizes for about a minute on 2 CPU cores for both organisms.
PLAN = (
    ("modality-gap", "modality-gap", dict(n=160)),
    ("cross-attention", "cross-attention", dict(n_per_class=24)),
    ("overlap", "overlap", dict(n_per_class=40, k=10)),
    ("ablation-vqa", "ablation", dict(task="vqa", n=240)),
    ("ablation-captions", "ablation", dict(task="captions", n=96, max_new_tokens=24)),
    ("ablation-classes", "ablation", dict(task="classes", n_per_class=40, k=10)),
    ("patching", "patching", dict(n_per_class=24)),
    ("gate-scan", "gate-scan", dict(n_per_class=2, bootstrap=500)),
)
SUMMARY = ("baseline", "eoi->text", "image->text")
#: Smallest sample sizes the metrics accept (ADP needs > 16 points per layer; overlap needs k < n per class).
FLOOR = {"n": 10, "n_per_class": 2}


#: The paper's "remove the gate" experiment in miniature: the remove-gate recipe ([EOI]->text knocked out while
#: training, LoRA rank 128 / alpha 256, AdamW with weight decay 0.1, cosine) on synthetic VQA and captions, with
#: fewer steps and a learning rate scaled up for a 1M-parameter model trained for seconds.
REMOVE_GATE: dict[str, Any] = dict(
    samples={"synthetic": 2000}, steps=125, batch_size=16, micro_batch=16, lr=2e-3, heldout=64
)
REMOVED = "gated, gate removed"


def organisms() -> dict[str, Path]:
    """The shipped organisms (native, non-native and, where shipped, gated)."""
    from . import organisms as org

    return {kind: org.path(kind) for kind in org.KINDS if (org.path(kind) / "config.json").is_file()}


def remove_gate(out: Path, gated: Path, *, scale: float = 1.0, progress: bool = True, console: Console) -> Path:
    """Fine-tune ``gated`` with the remove-gate recipe in miniature (`REMOVE_GATE`); returns the merged checkpoint.

    The same command from the shell: ``narrowgate finetune --model GATED --recipe remove-gate --data synthetic
    --samples synthetic=2000 --steps 125 --batch-size 16 --micro-batch 16 --lr 2e-3 --merge --out OUT``.
    """
    from .finetune import finetune

    cfg = dict(REMOVE_GATE, steps=max(2, int(REMOVE_GATE["steps"] * scale)))
    console.print(f"[bold]{REMOVED}[/bold]: remove-gate fine-tuning ({cfg['steps']} steps)")
    finetune(
        str(gated),
        "remove-gate",
        {"synthetic": None},
        out,
        merge=True,
        progress=progress,
        command=["narrowgate", "demo"],
        **cfg,
    )
    return out / "merged"


def demo(
    out: str | Path = "runs/demo",
    models: dict[str, Path] | None = None,
    *,
    scale: float = 1.0,
    batch_size: int = 8,
    progress: bool = True,
    console: Console | None = None,
    plan=PLAN,
) -> Path:
    """Run ``plan`` (default: every experiment) on each model; ``scale`` multiplies every sample size.

    Writes ``OUT/report.html`` and ``OUT/summary.csv`` (the ablation summary) and returns the report's path.
    """
    console = console or Console()
    out = Path(out)
    default = models is None
    models = dict(models or organisms())
    if default and "gated" in models:
        models[REMOVED] = remove_gate(
            out / "remove-gate", models["gated"], scale=scale, progress=progress, console=console
        )
    runs: dict[str, dict[str, Path]] = {}
    refused: dict[str, dict[str, str]] = {}
    started, done = time.perf_counter(), 0
    for label, path in models.items():
        vlm = load(path, dtype="float32")
        runs[label] = {}
        for name, experiment, settings in plan:
            cfg: dict[str, Any] = {k: (max(FLOOR[k], int(v * scale)) if k in FLOOR else v) for k, v in settings.items()}
            if "k" in cfg:  # a scaled-down class sample supports a smaller k (recorded in each run's config)
                cfg["k"] = min(cfg["k"], cfg["n_per_class"] - 1)
            cfg.update(
                model=str(path), data="synthetic", out=str(out / label / name), batch_size=batch_size, progress=progress
            )
            where = eta(done, len(models) * len(plan), time.perf_counter() - started)
            console.print(f"[bold]{label}[/bold]: {name}  (demo runs {where})")
            runs[label][name] = Path(cfg["out"])
            try:
                run(EXPERIMENTS[experiment](), cfg, vlm=vlm, command=["narrowgate", "demo"])
            except BaselineAtChance as e:  # that run's scores stay out of the summary and of every verdict
                refused.setdefault(label, {})[name] = str(e)
                console.print(f"[yellow]{label}: {name} gives no relative scores[/yellow]: {e}")
            done += 1
    summary = summarize(runs)
    verdicts = verdict(summary, models=list(runs), refused=refused)
    print_summary(summary, verdicts, console)
    summary.to_csv(out / "summary.csv", index=False)
    gates = gate_summary(runs, verdicts)
    if len(gates):
        gates.to_csv(out / "gates.csv", index=False)
        for text in gates["verdict"]:
            console.print(text)
    write_report(out, runs, summary, verdicts, plan, models, gates, refused)
    if REMOVED in runs:
        add_removal_section(out, summary)
    console.print(f"[green]report:[/green] {out / 'report.html'}")
    return out / "report.html"


def summarize(runs: dict[str, dict[str, Path]]) -> pd.DataFrame:
    """Per model and task: score of the baseline, the [EOI] knockout and the image knockout, and chance.

    An ablation run that refused its baseline (at or below chance) has no table and gives no row.
    """
    rows = []
    for label, by_name in runs.items():
        for name, path in by_name.items():
            if not name.startswith("ablation") or not (path / "tables" / "ablation.csv").is_file():
                continue
            df = pd.read_csv(path / "tables" / "ablation.csv").set_index("condition")
            for cond in SUMMARY:
                rows.append(
                    {
                        "model": label,
                        "task": name.removeprefix("ablation-"),
                        "metric": df.loc[cond, "metric"],
                        "condition": cond,
                        "score": df.loc[cond, "score"],
                        "relative": df.loc[cond, "relative"],
                        "chance": df.loc[cond, "chance"],
                    }
                )
    return pd.DataFrame(rows, columns=["model", "task", "metric", "condition", "score", "relative", "chance"])


NO_VERDICT = "no verdict"


def verdict(
    summary: pd.DataFrame, models: list[str] | None = None, refused: dict[str, dict[str, str]] | None = None
) -> dict[str, str]:
    """One sentence per model, from the mean relative scores of the two knockouts over the tasks whose
    baseline is above chance; a model with no such task gets no verdict (relative scores are undefined).

    ``models`` lists every model (also those without a row); ``refused`` the tasks each model's ablation
    refused (baseline at or below chance), named in its sentence.
    """
    out = {}
    refused = refused or {}
    for model in dict.fromkeys([*(models or []), *summary["model"]]):
        g = summary[summary["model"] == model]
        base = g[g["condition"] == "baseline"]
        above = set(base[base["score"] > base["chance"]]["task"])
        at_chance = sorted(set(base["task"]) - above | {n.removeprefix("ablation-") for n in refused.get(model, {})})
        solved = g[g["task"].isin(above)]
        if solved.empty:
            out[model] = (
                f"{model}: {NO_VERDICT} — its baseline is at or below chance on every task "
                f"({', '.join(at_chance) or 'none run'}), so scores relative to it are undefined."
            )
            continue
        rel = solved.groupby("condition")["relative"].mean()
        eoi, image = float(rel.get("eoi->text", float("nan"))), float(rel.get("image->text", float("nan")))
        if eoi < 0.75 and eoi < image:
            kind = "a narrow gate: blocking [EOI] alone hurts more than blocking every image token"
        elif image < 0.75 and image < eoi:
            kind = "distributed communication: the image reaches the text through the image tokens, not [EOI]"
        else:
            kind = "neither knockout changes the scores much at this sample size"
        tasks = ", ".join(sorted(solved["task"].unique()))
        left_out = f" ({', '.join(at_chance)}: baseline at chance, left out)" if at_chance else ""
        out[model] = (
            f"{model}: mean relative score over {tasks}{left_out} is {eoi:.2f} with [EOI]→text knocked out and "
            f"{image:.2f} with image→text knocked out — {kind}."
        )
    return out


def gate_summary(runs: dict[str, dict[str, Path]], verdicts: dict[str, str]) -> pd.DataFrame:
    """Per model, the gate scan's numbers and verdict, and whether it agrees with the ablation's verdict."""
    rows = []
    for label, by_name in runs.items():
        if "gate-scan" not in by_name:
            continue
        g = pd.read_csv(by_name["gate-scan"] / "tables" / "gate.csv").iloc[0]
        scan_gate = str(g["verdict"]).startswith("a narrow gate")
        ablation = verdicts.get(label, "")
        undecided = str(g["verdict"]).startswith(("no verdict", "inconclusive"))
        agree = (
            ""
            if NO_VERDICT in ablation or not ablation or undecided
            else ("agrees" if scan_gate == ("a narrow gate" in ablation) else "DISAGREES")
        )
        text = f"{label}: gate scan — {g['verdict']}"
        if agree:
            text += f" This {agree} with the ablation's verdict."
        rows.append(
            {
                "model": label,
                "gate_index": g["gate_index"],
                "gate_low": g["gate_low"],
                "gate_high": g["gate_high"],
                "sufficiency": g.get("sufficiency"),
                "positions_for_90": g["positions_for_90"],
                "top_position": g["top_position"],
                "agrees_with_ablation": agree,
                "verdict": text,
            }
        )
    return pd.DataFrame(rows)


def print_summary(summary: pd.DataFrame, verdicts: dict[str, str], console: Console) -> None:
    """The ablation summary as a table on ``console``, then the verdicts."""
    table = Table(title="Ablation summary (synthetic tasks)")
    for col in ("model", "task", "metric", *SUMMARY, "chance"):
        table.add_column(col)
    for (model, task), g in summary.groupby(["model", "task"], sort=False):
        scores = g.set_index("condition")["score"]
        row = [f"{scores[c]:.3f}" for c in SUMMARY]
        table.add_row(model, task, g["metric"].iloc[0], *row, f"{g['chance'].iloc[0]:.3f}")
    console.print(table)
    for text in verdicts.values():
        console.print(text)


def removal_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Relative scores of the gated organism before and after gate removal, per task and knockout."""
    sub = summary[summary["model"].isin(["gated", REMOVED]) & (summary["condition"] != "baseline")]
    return (
        sub.pivot_table(index=["task", "condition"], columns="model", values="relative")
        .reindex(columns=["gated", REMOVED])
        .rename(columns={"gated": "before (relative)", REMOVED: "after (relative)"})
        .rename_axis(columns=None)
        .reset_index()
    )


def add_removal_section(out: Path, summary: pd.DataFrame) -> None:
    """Append the before/after gate-removal comparison to the report."""
    card = json.loads((out / "remove-gate" / "card.json").read_text())
    report.append_section(
        out / "report.html",
        [
            "<h2>Removing the gate (the paper's fine-tuning experiment, in miniature)</h2><p>The gated organism "
            f"fine-tuned with the remove-gate recipe ({report.escape(', '.join(card['knockouts']))} knocked out "
            f"while training, {card['steps']} steps; card: <a href='remove-gate/CARD.md'>remove-gate/CARD.md</a>). "
            "Scores with each knockout relative to the model's own baseline, before and after:</p>",
            report.table(removal_table(summary), ".3f", na_rep="none (baseline at chance)"),
        ],
    )


def model_table(models: dict[str, Path]) -> str:
    """Each model's checkpoint and, when it has a training card (the organisms), its held-out scores vs chance."""
    rows = []
    for label, path in models.items():
        row = {"model": label, "checkpoint": str(path)}
        card = Path(path) / "card.json"
        if card.is_file():
            h = json.loads(card.read_text()).get("heldout") or {}
            if h:
                row.update(
                    {
                        "VQA accuracy (chance)": f"{h['vqa']['accuracy']:.3f} ({h['vqa']['chance']:.3f})",
                        "caption CIDEr-D (chance)": f"{h['captions']['cider']:.2f} ({h['captions']['chance']:.2f})",
                        "class top-1 (chance)": f"{h['classes']['accuracy']:.3f} ({h['classes']['chance']:.3f})",
                    }
                )
        rows.append(row)
    return report.table(pd.DataFrame(rows).fillna(""))


def write_report(
    out: Path,
    runs: dict[str, dict[str, Path]],
    summary: pd.DataFrame,
    verdicts: dict[str, str],
    plan=PLAN,
    models: dict[str, Path] | None = None,
    gates: pd.DataFrame | None = None,
    refused: dict[str, dict[str, str]] | None = None,
) -> None:
    """The demo's ``OUT/report.html``: the models side by side, experiment by experiment (`narrowgate.report`)."""
    labels = list(runs)
    refused = refused or {}
    parts = [
        "<h1>narrowgate demo</h1>",
        "<p>Every experiment of the paper on "
        + "; ".join(report.escape(x) for x in labels)
        + ", on synthetic images. Each run's own report is linked under its figures.</p>",
        *(["<h2>Models (held-out scores from their training cards)</h2>", model_table(models)] if models else []),
        "<h2>Verdict (from the measured numbers)</h2><ul>",
        *[f"<li>{report.escape(v)}</li>" for v in verdicts.values()],
        "</ul><h2>Ablation summary</h2>",
        report.table(
            summary.pivot_table(index=["model", "task", "metric", "chance"], columns="condition", values="score")
            .reindex(columns=list(SUMMARY))
            .rename_axis(columns=None)
            .reset_index(),
            ".3f",
        ),
    ]
    if gates is not None and len(gates):
        parts += [
            "<h2>Gate scan (every image-side position knocked out alone)</h2><ul>",
            *[f"<li>{report.escape(v)}</li>" for v in gates["verdict"]],
            "</ul>",
            report.table(gates.drop(columns="verdict"), ".3f"),
        ]
    for name, experiment, _ in plan:
        parts.append(f"<h2>{report.escape(name)}</h2><table><tr>")
        parts += [f"<th>{report.escape(lab)}</th>" for lab in labels]
        parts.append("</tr><tr>")
        for lab in labels:
            if name in refused.get(lab, {}):
                parts.append(f"<td>No relative scores: {report.escape(refused[lab][name])}</td>")
                continue
            figs = sorted((runs[lab][name] / "figures").glob("*.png"))
            link = f"<br><a href='{lab}/{name}/report.html'>run</a>"
            parts.append("<td>" + "".join(report.image(f) for f in figs) + link + "</td>")
        parts.append("</tr></table>")
        if EXPERIMENTS[experiment].curve is not None:
            loaded = [
                (lab, RunStore(runs[lab][name]).tables(), json.loads((runs[lab][name] / "manifest.json").read_text()))
                for lab in labels
                if name not in refused.get(lab, {})
            ]
            overlay = EXPERIMENTS[experiment]().compare(loaded)
            for png in (p for p in write_compare(overlay, experiment, out / "compare" / name) if p.endswith(".png")):
                parts.append(f"<p>Overlay on relative depth:</p>{report.image(Path(png))}")
    report.write_page(out / "report.html", "narrowgate demo", parts, width=1300, font_size=13)
